use breakwater::cache::*;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

fn entry(i: usize, body: usize) -> Bytes {
    let h = |n: &'static str, v: String| (HeaderName::from_static(n), HeaderValue::from_str(&v).unwrap());
    CachedResponse {
        status: 200,
        headers: vec![
            h("content-type", "text/plain".into()),
            h("etag", format!("\"v{i}\"")),
            h("last-modified", "Sun, 13 Sep 2020 12:26:40 GMT".into()),
            h("date", "Sun, 13 Sep 2020 12:26:40 GMT".into()),
            h("x-origin-version", "1".into()),
        ],
        body: Bytes::from(vec![b'x'; body]),
        stored_at_ms: 1, ttl_ms: 3_600_000, swr_ms: 0, sie_ms: 0, vary: vec![],
    }.encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let max: u64 = std::env::var("MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 30);
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let m = MemoryBackend::new(max);
    let r0 = rss();
    let mut weight = 0;
    for i in 0..n {
        let k = CacheKey::new(KeyParts { service: "cached", https: false, host: "127.0.0.1:34567", path: &format!("/c/{i}"), query: Some("bytes=200"), user: None });
        let v = entry(i, std::env::var("BODY").ok().and_then(|v| v.parse().ok()).unwrap_or(200));
        weight = (k.as_str().len() + v.len()) as u64;
        m.put(&k, v, Duration::from_secs(3600)).await.unwrap();
    }
    let held = m.bytes().unwrap();
    let r1 = rss();
    eprintln!("N={n} key+value={weight} rss grown {} => {} B/entry; weighted {} => {} B/entry; entries kept ~{}",
        r1 - r0, (r1 - r0) / n as u64, held, held / n as u64, held / (weight + ENTRY_OVERHEAD));
}
