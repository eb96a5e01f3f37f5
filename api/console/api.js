// The console's side of the JSON API (docs/console.md). Requests carry
// the session cookie (same origin); those that change something also
// carry the session's cross-site secret, which only this page can read.

let csrf = null;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    if (csrf === null) {
      csrf = (await call("GET", "/session")).csrf;
    }
    headers["X-CSRF-Token"] = csrf;
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch("/api/v1" + path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    // The session ended (a daemon restart, or it expired): log in again.
    window.location.assign("/login");
    throw new ApiError(401, "not logged in");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text };
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || response.statusText);
  }
  return data;
}

const v = (name) => "/volumes/" + encodeURIComponent(name);

export const api = {
  status: () => call("GET", "/status"),
  volume: (name) => call("GET", v(name)),
  tags: (name) => call("GET", v(name) + "/tags"),
  timeline: (name, from, to) => {
    const q = new URLSearchParams();
    if (from) q.set("from", from);
    if (to) q.set("to", to);
    return call("GET", v(name) + "/timeline?" + q);
  },
  activity: (name, from, to, buckets) => {
    const q = new URLSearchParams({ buckets: String(buckets) });
    if (from) q.set("from", from);
    if (to) q.set("to", to);
    return call("GET", v(name) + "/activity?" + q);
  },
  flushes: (name, from, to) =>
    call("GET", v(name) + "/flushes?" + new URLSearchParams({ from, to })),
  point: (name, at) => call("GET", v(name) + "/point?" + new URLSearchParams({ at })),
  createTag: (name, tag, note) => call("POST", v(name) + "/tags", { name: tag, note }),
  verifyTag: (name, tag) => call("POST", v(name) + "/tags/" + encodeURIComponent(tag) + "/verify", {}),
  export: (name, at) => call("POST", v(name) + "/exports", { at }),
  unexport: (exportName) => call("DELETE", "/exports/" + encodeURIComponent(exportName)),
  restore: (name, at, to) =>
    call("POST", v(name) + "/restore", { at, to, confirm: name + "@" + at }),
  rollback: (name, at) => call("POST", v(name) + "/rollback", { to: at, confirm: name + "@" + at }),
  jobs: () => call("GET", "/jobs"),
  replicas: () => call("GET", "/replicas"),
  archive: () => call("GET", "/archive"),
  failover: (name, at) => call("POST", v(name) + "/failover", { at }),
  failback: (name) => call("POST", v(name) + "/failback", {}),
};
