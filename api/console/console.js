// The console page: the overview of every volume, one volume's timeline,
// choosing a point and acting on it. It polls the JSON API (every two
// seconds, every second while a restore runs), so what happens elsewhere
// (a tag from the CLI, a restore, a takeover) shows without a reload.

import { api } from "./api.js";
import { Timeline, SOURCES, parseTime, tagDetail, describe, pointOf } from "./timeline.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
// The overview shows journal and cache use of up to this many volumes.
const DETAILS_FOR = 50;

const state = {
  status: null,
  replicas: [],
  archive: null,
  jobs: [],
  volume: null, // the chosen volume's name
  detail: null,
  details: new Map(), // volume -> its detail, for the overview
  timeline: null,
  timelineKey: "",
  chosen: null, // { at, seq, t, point, snapped, flush }
  attention: new Map(), // volume -> [alert text]
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Number(n) || 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return (i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
}

function shortTime(text) {
  if (!text) return "—";
  return text.replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function seconds(s) {
  if (s === undefined || s === null) return "—";
  if (s < 1) return s.toFixed(2) + " s";
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function say(text, isError) {
  const out = $("action-result");
  out.textContent = text;
  out.className = isError ? "error" : "";
}

// ---- overview ---------------------------------------------------------

async function refreshOverview() {
  const [status, replicas, archive, jobs] = await Promise.all([
    api.status(),
    api.replicas().catch(() => ({ replicas: [] })),
    api.archive().catch(() => null),
    api.jobs().catch(() => []),
  ]);
  state.status = status;
  // Journal size and cache use per volume, for a page of volumes; beyond
  // that only the chosen one's (a request each would be too many).
  const names = (status.volumes || []).map((v) => v.name);
  const shown = names.length <= DETAILS_FOR ? names : names.filter((n) => n === state.volume);
  const details = await Promise.all(shown.map((n) => api.volume(n).catch(() => null)));
  state.details = new Map(shown.map((n, i) => [n, details[i]]));
  state.replicas = replicas.replicas || [];
  state.archive = archive;
  state.jobs = jobs;
  $("site").textContent = `${status.role} site · epoch ${status.epoch} · v${status.version}`;
  renderVolumes();
  renderJobs();
  renderAttention();
}

function replicaOf(volume) {
  return state.replicas.find((r) => r.volume === volume);
}

function archiveOf(group) {
  return state.archive && (state.archive.groups || []).find((g) => g.group === group);
}

function renderVolumes() {
  const volumes = state.status.volumes || [];
  $("no-volumes").hidden = volumes.length > 0;
  const body = $("volumes").tBodies[0];
  body.replaceChildren(
    ...volumes.map((v) => {
      const r = replicaOf(v.name);
      const a = archiveOf(v.group);
      const d = (state.volume === v.name && state.detail) || state.details.get(v.name) || null;
      const cache = d && d.cache ? `${bytes(d.cache.memory_bytes)} / ${bytes(d.cache.file_bytes)}` : "—";
      const mode = v.mode === v.effective_mode || !v.effective_mode ? v.mode : `${v.mode} (now ${v.effective_mode})`;
      return el(
        "tr",
        { class: state.volume === v.name ? "selected" : "" },
        el("th", { scope: "row" }, el("a", { href: "#volume=" + encodeURIComponent(v.name) }, v.name)),
        el("td", {}, bytes(v.size)),
        el("td", {}, v.group),
        el("td", {}, mode),
        el("td", {}, `${v.role} / ${v.epoch}`),
        el("td", {}, `seq ${v.newest_seq}`, el("br"), el("small", {}, shortTime(v.newest_time))),
        el("td", {}, `seq ${v.horizon_seq}`, el("br"), el("small", {}, shortTime(v.horizon_time))),
        el("td", {}, d ? bytes(d.journal_bytes) : "—"),
        el("td", {}, cache),
        el("td", {}, r ? `${r.state} · RPO ${seconds(r.rpo_seconds)}` : "—"),
        el("td", {}, a ? (a.last_error ? "error" : seconds(a.lag_seconds)) : "—"),
      );
    }),
  );
}

// What needs attention, worst first, for every volume we know about.
async function collectAttention() {
  const volumes = (state.status && state.status.volumes) || [];
  for (const v of volumes) {
    const alerts = [];
    const r = replicaOf(v.name);
    if (r) {
      if (r.state === "disconnected") alerts.push(`replica ${r.address} is disconnected${r.last_error ? ": " + r.last_error : ""}`);
      // The daemon's own alert, as `[replication] rpo_alert` sets it.
      if (r.rpo_alert) alerts.push(`RPO alert: the replica is ${seconds(r.rpo_seconds)} behind`);
      // A sync replica that fell back to async (degraded); an adaptive
      // one that runs async for now is worth knowing too.
      if (r.effective_mode && r.effective_mode !== "sync" && r.mode !== "async") {
        alerts.push(`replica ${r.address} runs ${r.effective_mode}, configured ${r.mode}${r.mode === "sync" ? " (degraded)" : ""}: acknowledged writes may not be on it yet`);
      }
    }
    // An adaptive volume running async: acknowledged writes are not all
    // in the journal yet (its IO mode falls back under a slow journal).
    if (v.effective_mode === "async" && v.mode !== "async") alerts.push(`runs async, configured ${v.mode} (degraded)`);
    const a = archiveOf(v.group);
    if (a && a.last_error) alerts.push(`archive: ${a.last_error}`);
    try {
      const t = await api.timeline(v.name);
      for (const e of t.entries) {
        if (e.kind === "gap") alerts.push(`gap: ${e.name}`);
        if (e.kind === "tag" && tagDetail(e.detail).verified === "failed") alerts.push(`tag ${e.name} failed verification`);
      }
    } catch {
      // The volume may have just gone; the next round sees it.
    }
    state.attention.set(v.name, alerts);
  }
  for (const name of [...state.attention.keys()]) {
    if (!volumes.some((v) => v.name === name)) state.attention.delete(name);
  }
  renderAttention();
}

function renderAttention() {
  const items = [];
  for (const [volume, alerts] of state.attention) {
    for (const text of alerts) {
      items.push(el("li", {}, el("a", { href: "#volume=" + encodeURIComponent(volume) }, volume), ": " + text));
    }
  }
  for (const j of state.jobs) {
    if (j.state === "failed") items.push(el("li", {}, `${j.kind} of ${j.volume} at ${j.at} failed: ${j.error}`));
  }
  $("attention").hidden = items.length === 0;
  $("alerts").replaceChildren(...items);
}

function renderJobs() {
  $("jobs").hidden = state.jobs.length === 0;
  $("job-list").replaceChildren(
    ...state.jobs.map((j) => {
      const pct = j.total_bytes ? Math.floor((100 * j.done_bytes) / j.total_bytes) : 0;
      const what =
        j.kind === "rollback"
          ? `roll back ${j.volume} to ${j.at}${j.seq ? " (seq " + j.seq + ")" : ""}`
          : `restore ${j.volume} at ${j.at}${j.seq ? " (seq " + j.seq + ")" : ""} → ${j.to}`;
      return el(
        "li",
        { class: "job " + j.state, "data-job": j.id, "data-kind": j.kind },
        what + ": ",
        el("progress", { max: "100", value: String(j.state === "done" ? 100 : pct), "aria-label": j.kind + " progress" }),
        ` ${j.state}${j.state === "running" ? " " + pct + "%" : ""}${j.error ? " — " + j.error : ""}`,
      );
    }),
  );
}

// ---- one volume -------------------------------------------------------

let timeline = null;

function selectFromHash() {
  const m = /volume=([^&]+)/.exec(window.location.hash);
  const name = m ? decodeURIComponent(m[1]) : null;
  if (name === state.volume) return;
  state.volume = name;
  state.detail = null;
  state.timeline = null;
  state.timelineKey = "";
  state.chosen = null;
  renderChosen();
  $("volume").hidden = !name;
  if (name) {
    $("volume-title").textContent = "Volume " + name;
    timeline.range = null;
    refreshVolume(true);
  }
}

async function refreshVolume(reloadChart) {
  const name = state.volume;
  if (!name) return;
  let detail;
  let t;
  try {
    [detail, t] = await Promise.all([api.volume(name), api.timeline(name)]);
  } catch (e) {
    say(`volume ${name}: ${e.message}`, true);
    return;
  }
  if (name !== state.volume) return;
  state.detail = detail;
  state.timeline = t;
  const key = JSON.stringify(t.entries) + t.horizon_seq;
  const changed = key !== state.timelineKey;
  state.timelineKey = key;
  const v = detail.volume;
  timeline.set(
    { horizon_time: v.horizon_time, newest_time: v.newest_time },
    t.entries,
  );
  if (reloadChart) timeline.load();
  else if (changed || !timeline.range) timeline.refresh();
  if (changed) renderMarks();
  renderDetails();
  renderVolumes();
}

function renderDetails() {
  const d = state.detail;
  const v = d.volume;
  const r = (d.replicas || [])[0];
  const a = archiveOf(v.group);
  const rows = [
    ["Size", bytes(v.size)],
    ["Group", v.group],
    ["Mode", v.effective_mode && v.effective_mode !== v.mode ? `${v.mode} (now ${v.effective_mode})` : v.mode],
    ["Role / epoch", `${v.role} / ${v.epoch}`],
    ["Newest point", `seq ${v.newest_seq} · ${shortTime(v.newest_time)}`],
    ["Horizon", `seq ${v.horizon_seq} · ${shortTime(v.horizon_time)}`],
    ["Journal", bytes(d.journal_bytes)],
    ["Cache", d.cache ? `memory ${bytes(d.cache.memory_bytes)} of ${bytes(d.cache.memory_limit)} · file ${bytes(d.cache.file_bytes)} of ${bytes(d.cache.file_limit)}` : "—"],
    ["Writes", d.stats ? `${d.stats.writes} (${bytes(d.stats.bytes)}), ${d.stats.mode_switches} mode switches, ${d.stats.dirty_regions} dirty regions` : "—"],
    ["NBD clients", String(d.nbd_clients)],
    ["Replica", r ? `${r.address} · ${r.state} · ${r.mode} · acked seq ${r.acked_seq} · lag ${seconds(r.lag_seconds)} · RPO ${seconds(r.rpo_seconds)}` : "none"],
    ["Archive", a ? `up to seq ${a.archived_seq} · lag ${seconds(a.lag_seconds)} · ${bytes(a.bytes)} in ${a.objects} objects${a.last_error ? " · " + a.last_error : ""}` : "none"],
  ];
  $("volume-details").replaceChildren(...rows.flatMap(([k, val]) => [el("dt", {}, k), el("dd", {}, val)]));
  $("failover-row").hidden = v.role !== "replica";
  $("failback-row").hidden = !(v.role === "primary" && v.epoch > 0);
}

const SHAPES = { circle: "●", square: "■", triangle: "▲", diamond: "◆", down: "▼" };

function renderMarks() {
  const t = state.timeline;
  if (!t) return;
  const search = $("mark-search").value.trim().toLowerCase();
  const source = $("mark-source").value;
  const items = t.entries
    .filter((e) => e.kind !== "flush")
    .filter((e) => {
      if (!source) return true;
      if (source === "events") return e.kind !== "tag";
      return e.kind === "tag" && tagDetail(e.detail).source === source;
    })
    .filter((e) => !search || (e.name + " " + e.detail).toLowerCase().includes(search))
    .reverse()
    .map((e) => {
      const mark = { ...e, t: parseTime(e.time), tag: e.kind === "tag" ? tagDetail(e.detail) : null };
      let badge;
      if (mark.tag) {
        const s = SOURCES[mark.tag.source] || SOURCES.manual;
        badge = el("span", { class: "badge src-" + (mark.tag.source || "manual"), "aria-hidden": "true" }, SHAPES[s.shape]);
      } else {
        badge = el("span", { class: "badge " + (e.kind === "gap" ? "gap" : "event"), "aria-hidden": "true" }, e.kind === "gap" ? "■" : "◆");
      }
      const verified = mark.tag ? { passed: "✓ verified", failed: "✗ failed verification", none: "" }[mark.tag.verified] || "" : "";
      return el(
        "li",
        { class: "mark " + e.kind, "data-name": e.name, "data-seq": String(e.seq) },
        el(
          "button",
          { type: "button", onclick: () => choose(pointOf(mark), mark.t, mark), title: describe(mark) },
          badge,
          el("span", { class: "mark-name" }, e.kind === "tag" ? e.name : `${e.kind}: ${e.name}`),
          el(
            "span",
            { class: "mark-meta" },
            `seq ${e.seq} · ${shortTime(e.time)}`,
            mark.tag ? ` · ${mark.tag.source} · ${mark.tag.consistency}` : "",
            verified ? " · " + verified : "",
          ),
        ),
      );
    });
  $("mark-list").replaceChildren(...items);
}

function renderLegend() {
  const items = Object.entries(SOURCES)
    .filter(([k]) => k !== "event")
    .map(([name, s]) => el("li", {}, el("span", { class: "badge src-" + name, "aria-hidden": "true" }, SHAPES[s.shape]), " " + name + " tag"));
  items.push(el("li", {}, el("span", { class: "badge src-event", "aria-hidden": "true" }, SHAPES.square), " tag from an event"));
  items.push(el("li", {}, el("span", { class: "badge event", "aria-hidden": "true" }, "◆"), " system event"));
  items.push(el("li", {}, el("span", { class: "badge gap", "aria-hidden": "true" }, "■"), " gap"));
  items.push(el("li", {}, "filled: app-consistent · hollow: crash-consistent · struck through: failed verification · ticks at the bottom: flush points"));
  $("legend").replaceChildren(...items);
}

// ---- choosing a point --------------------------------------------------

// `at` is what the user chose (a POINT); `t` its time when known.
async function choose(at, t, mark) {
  const name = state.volume;
  if (!name) return;
  let p;
  try {
    p = await api.point(name, at);
  } catch (e) {
    say(e.message, true);
    return;
  }
  const named = /^(tag|before):/.test(at);
  const snap = $("snap").checked && !named && p.flush_seq !== null && p.flush_seq !== p.seq;
  const seq = snap ? p.flush_seq : p.seq;
  let time = snap ? parseTime(p.flush_time) : t;
  const entries = (state.timeline && state.timeline.entries) || [];
  if (time === undefined || time === null || Number.isNaN(time)) {
    const same = entries.find((e) => e.seq === seq);
    time = same ? parseTime(same.time) : NaN;
  }
  const tags = entries.filter((e) => e.kind === "tag");
  state.chosen = {
    at,
    seq,
    t: time,
    snapped: snap,
    point: named ? at : String(seq),
    flush: p.flush_seq !== null ? { seq: p.flush_seq, time: p.flush_time } : null,
    tagBefore: [...tags].reverse().find((e) => e.seq <= seq) || null,
    tagAfter: tags.find((e) => e.seq > seq) || null,
    tag: at.startsWith("tag:") ? at.slice(4) : null,
  };
  $("point-input").value = at;
  timeline.choose(time);
  renderChosen();
  say("");
  $("export-out").hidden = true;
}

function renderChosen() {
  const c = state.chosen;
  $("actions").hidden = !c;
  if (!c) {
    $("chosen").replaceChildren(el("p", { class: "hint" }, "No point chosen yet."));
    return;
  }
  const rows = [
    ["Point", c.point + (c.point !== c.at ? ` (from ${c.at})` : "")],
    ["Seq", String(c.seq)],
    ["Time", Number.isNaN(c.t) ? "—" : new Date(c.t * 1000).toISOString()],
    ["Nearest tags", `${c.tagBefore ? "before: " + c.tagBefore.name + " (seq " + c.tagBefore.seq + ")" : "none before"} · ${c.tagAfter ? "after: " + c.tagAfter.name + " (seq " + c.tagAfter.seq + ")" : "none after"}`],
    ["Nearest flush point", c.flush ? `seq ${c.flush.seq} · ${shortTime(c.flush.time)}${c.snapped ? " (snapped to it)" : ""}` : "none in the retained history"],
  ];
  $("chosen").replaceChildren(el("dl", { id: "chosen-point" }, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  $("do-verify").hidden = !c.tag;
}

// ---- acting on it ------------------------------------------------------

function confirmDialog(title, text, okLabel) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-cancel").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function act(what, work) {
  say(what + "…");
  try {
    const message = await work();
    if (message) say(message);
  } catch (e) {
    say(`${what} failed: ${e.message}`, true);
  }
  refreshVolume(false);
  refreshOverview().catch(() => {});
}

function wireActions() {
  $("point-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const at = $("point-input").value.trim();
    if (at) choose(at, parseTime(at));
  });
  $("pick-latest").addEventListener("click", () => choose("latest"));
  $("pick-verified").addEventListener("click", () => choose("last-verified"));
  $("pick-anomaly").addEventListener("click", () => {
    const anomalies = ((state.timeline && state.timeline.entries) || []).filter(
      (e) => e.kind === "tag" && tagDetail(e.detail).source === "anomaly",
    );
    const last = anomalies[anomalies.length - 1];
    if (last) choose("before:" + last.name);
    else say("no anomaly tag in this volume's history", true);
  });
  $("zoom-in").addEventListener("click", () => timeline.zoom(0.5));
  $("zoom-out").addEventListener("click", () => timeline.zoom(2));
  $("zoom-all").addEventListener("click", () => timeline.reset());
  $("zoom-hour").addEventListener("click", () => {
    const now = Date.now() / 1000;
    timeline.zoomTo(now - 3600, now);
  });
  $("mark-search").addEventListener("input", renderMarks);
  $("mark-source").addEventListener("change", renderMarks);
  $("snap").addEventListener("change", () => state.chosen && choose(state.chosen.at, state.chosen.t));

  $("do-export").addEventListener("click", () =>
    act("Exporting", async () => {
      const c = state.chosen;
      const e = await api.export(state.volume, c.point);
      $("export-uri").textContent = e.uri;
      // All as root: mount (root) cannot open a FUSE file another user
      // made without allow_other. noload: ext3/ext4 (XFS: norecovery).
      $("export-nbdfuse").textContent = `sudo mkdir -p /tmp/${e.name} && (sudo nbdfuse /tmp/${e.name} '${e.uri}' &) && sleep 1 && sudo mount -o ro,loop,noload /tmp/${e.name}/nbd /mnt`;
      $("export-qemu").textContent = `qemu-img convert -p -O raw '${e.uri}' '${e.name.replace(/[^\w.-]/g, "_")}.img'`;
      $("export-out").hidden = false;
      return `exported ${state.volume} at ${c.point} (seq ${e.seq}) as ${e.name}, read-only`;
    }),
  );
  $("do-verify").addEventListener("click", () =>
    act("Verifying", async () => {
      const tag = await api.verifyTag(state.volume, state.chosen.tag);
      return `tag ${tag.name}: verification ${tag.verified}`;
    }),
  );
  $("restore-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const c = state.chosen;
    const to = $("restore-to").value.trim();
    const name = state.volume;
    const ok = await confirmDialog(
      `Restore ${name}@${c.point}?`,
      `Writes volume ${name} as it was at ${c.point} (seq ${c.seq}) to ${to} on the daemon's machine. An existing file there is overwritten.`,
      `Restore ${name}@${c.point}`,
    );
    if (!ok) return;
    act("Starting the restore", async () => {
      const job = await api.restore(name, c.point, to);
      pollSoon();
      return `restore ${job.id} started: ${name}@${c.point} → ${to}`;
    });
  });
  $("do-rollback").addEventListener("click", async () => {
    const c = state.chosen;
    const name = state.volume;
    const ok = await confirmDialog(
      `Roll back ${name} to ${c.point}?`,
      `Volume ${name} goes back to how it was at ${c.point} (seq ${c.seq}), in place, now: the writes after it are undone on the live volume. The rollback is itself journalled, so the state before it stays a point you can return to. Stop the applications using ${name} first.`,
      `Roll back ${name} to ${c.point}`,
    );
    if (!ok) return;
    act(`Rolling back ${name}`, async () => {
      // The request stays open until the rollback is done; its job shows
      // the progress meanwhile.
      const rolling = api.rollback(name, c.point);
      pollSoon();
      const r = await rolling;
      return `rolled ${name} back to seq ${r.to_seq}: ${r.blocks} blocks (${bytes(r.bytes)}) rewritten; the state before it is seq ${r.undo_seq}`;
    });
  });
  $("do-failover").addEventListener("click", async () => {
    const c = state.chosen;
    const name = state.volume;
    const ok = await confirmDialog(
      `Take over ${name} at ${c.point}?`,
      `This site becomes the primary of ${name}'s group at ${c.point} (seq ${c.seq}) with a new epoch; the old primary is fenced and must not write again.`,
      `Take over ${name} at ${c.point}`,
    );
    if (!ok) return;
    act(`Taking over ${name}`, async () => {
      const r = await api.failover(name, c.point);
      return `took over ${name}: ${JSON.stringify(r)}`;
    });
  });
  $("do-failback").addEventListener("click", async () => {
    const name = state.volume;
    const ok = await confirmDialog(`Fail ${name} back?`, `Hands ${name}'s group back to the site it was taken over from, after it has caught up.`, `Fail ${name} back`);
    if (!ok) return;
    act(`Failing ${name} back`, async () => `failback: ${JSON.stringify(await api.failback(name))}`);
  });
  $("tag-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const tag = $("tag-name").value.trim();
    act("Creating the tag", async () => {
      const t = await api.createTag(state.volume, tag, "from the console");
      $("tag-name").value = "";
      return `tag ${t.name} set at seq ${t.seq}`;
    });
  });
  document.addEventListener("click", (e) => {
    const id = e.target && e.target.dataset ? e.target.dataset.copy : null;
    if (!id) return;
    // The clipboard API exists on HTTPS and localhost only: elsewhere the
    // text is selected, for Ctrl+C.
    const select = () => window.getSelection().selectAllChildren($(id));
    if (navigator.clipboard) navigator.clipboard.writeText($(id).textContent).catch(select);
    else select();
  });
}

// ---- polling -----------------------------------------------------------

let timer = null;
let rounds = 0;

function pollSoon() {
  clearTimeout(timer);
  timer = setTimeout(poll, 300);
}

async function poll() {
  clearTimeout(timer);
  try {
    await refreshOverview();
    if (state.volume) await refreshVolume(false);
    if (rounds++ % 5 === 0) collectAttention();
  } catch (e) {
    $("site").textContent = "cannot reach the daemon: " + e.message;
  }
  const running = state.jobs.some((j) => j.state === "running");
  timer = setTimeout(poll, running ? 1000 : POLL_MS);
}

function start() {
  timeline = new Timeline($("timeline"), {
    fetchActivity: (from, to, buckets) => api.activity(state.volume, from, to, buckets),
    fetchFlushes: (from, to) => api.flushes(state.volume, from, to),
    onChoose: (at, t) => choose(at, t),
    tooltip: $("tooltip"),
  });
  renderLegend();
  wireActions();
  window.addEventListener("hashchange", selectFromHash);
  poll().then(() => {
    if (!window.location.hash && state.status && state.status.volumes.length) {
      window.location.hash = "volume=" + encodeURIComponent(state.status.volumes[0].name);
    }
    selectFromHash();
  });
}

start();
