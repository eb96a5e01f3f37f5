//! The S3 harness itself: a real moto server starts on its own port,
//! creates buckets, stores, lists, replaces and deletes objects over plain
//! HTTP, keeps them across a pause, and is gone once dropped.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidemark_tests::s3::Moto;

#[test]
fn moto_serves_objects_and_pauses() {
    let Some(moto) = Moto::start("moto_serves_objects_and_pauses") else {
        return;
    };
    assert!(moto.endpoint.starts_with("http://127.0.0.1:"));
    assert_eq!(moto.endpoint, format!("http://{}", moto.address));
    assert!(!moto.address.ends_with(":5000"));
    let env = moto.env();
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_EC2_METADATA_DISABLED",
    ] {
        assert!(env.iter().any(|(k, _)| k == name), "{name} in {env:?}");
    }

    let bucket = "tidemark-smoke";
    moto.create_bucket(bucket);
    moto.create_bucket(bucket); // again: no error for its owner
    assert!(moto.list_keys(bucket).is_empty());

    // Binary content (every byte value, CR LF included), and keys that
    // need encoding in a URL and escaping in XML.
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let keys = ["volumes/demo/seg 0001 & +.bin", "volumes/demo/<index>"];
    for key in keys {
        moto.put_raw(bucket, key, &data);
        assert_eq!(moto.get_raw(bucket, key), data, "{key}");
    }
    let mut sorted = keys.map(String::from).to_vec();
    sorted.sort();
    assert_eq!(moto.list_keys(bucket), sorted);

    // Corrupt an object behind the client's back: a flipped byte.
    let mut corrupt = data.clone();
    corrupt[1234] ^= 0xff;
    moto.put_raw(bucket, keys[0], &corrupt);
    assert_eq!(moto.get_raw(bucket, keys[0]), corrupt);
    moto.delete_raw(bucket, keys[1]);
    assert_eq!(moto.list_keys(bucket), [keys[0]]);

    // More keys than one listing page holds.
    let other = "tidemark-smoke-many";
    moto.create_bucket(other);
    for i in 0..1001 {
        moto.put_raw(other, &format!("k/{i:04}"), b"x");
    }
    let listed = moto.list_keys(other);
    assert_eq!(listed.len(), 1001);
    assert_eq!(listed[0], "k/0000");
    assert_eq!(listed[1000], "k/1000");

    // Paused, it accepts connections but answers nothing; resumed, it
    // answers again with what it held.
    moto.pause();
    assert!(!moto.answers(Duration::from_millis(500)));
    moto.resume();
    assert!(moto.answers(Duration::from_secs(10)));
    assert_eq!(moto.get_raw(bucket, keys[0]), corrupt);

    // Dropped while paused, it is stopped and reaped all the same.
    let pid = moto.pid();
    moto.pause();
    drop(moto);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "moto (pid {pid}) still runs after the drop"
    );
}
