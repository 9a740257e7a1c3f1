//! Cost of path normalization and of the request's edge checks, which every request pays: the
//! common case (a path that is normal already) must be one scan without allocating.

use std::hint::black_box;

use breakwater::edge::headers::{HeaderRules, Underscores};
use breakwater::edge::path::PathRules;
use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderName;
use pingora::http::RequestHeader;

fn path_benches(c: &mut Criterion) {
    let rules = PathRules::default();
    for (name, path) in [
        ("normal_short", "/users/42"),
        ("normal_typical", "/api/v1/users/42/orders/2024-05-01"),
        (
            "normal_long_encoded",
            "/static/assets/images/2024/05/a%20photo%C3%A9/thumbnails/large/picture.jpg",
        ),
        ("dot_segments", "/api/v1/./users/../users/42"),
        ("encoded_unreserved", "/%61pi/v1/users/%34%32"),
    ] {
        c.bench_function(&format!("path/{name}"), |b| {
            b.iter(|| rules.normalize(black_box(path)).map(|p| p.len()))
        });
    }
}

fn header_benches(c: &mut Criterion) {
    let rules = HeaderRules::new(Underscores::Drop, &[HeaderName::from_static("x-user-id")]);
    let mut req = RequestHeader::build("GET", b"/api/v1/users/42", None).unwrap();
    for (name, value) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/126.0",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.5"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"),
        ("x-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        ("connection", "keep-alive"),
    ] {
        req.insert_header(name, value).unwrap();
    }
    c.bench_function("headers/clean_typical", |b| {
        b.iter(|| rules.clean(black_box(&mut req), false))
    });
}

criterion_group!(benches, path_benches, header_benches);
criterion_main!(benches);
