//! Hot-path cost of the circuit breaker and retry budget: what every proxied request pays.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use breakwater::clock::MonotonicClock;
use breakwater::upstream::breaker::{BreakerConfig, CircuitBreaker, Outcome};
use breakwater::upstream::retry::{RetryBudget, RetryBudgetConfig};
use criterion::{criterion_group, criterion_main, Criterion};

const CONTENDING_THREADS: usize = 4;

fn closed_breaker() -> Arc<CircuitBreaker> {
    Arc::new(CircuitBreaker::new(
        BreakerConfig::default(),
        Arc::new(MonotonicClock::new()),
    ))
}

fn admit_record(breaker: &Arc<CircuitBreaker>) {
    if let Some(permit) = breaker.try_acquire() {
        permit.record(black_box(Outcome::Success));
    }
}

fn breaker_benches(c: &mut Criterion) {
    let breaker = closed_breaker();
    c.bench_function("breaker/admit_record_single", |b| {
        b.iter(|| admit_record(&breaker))
    });
    c.bench_function("breaker/would_admit", |b| {
        b.iter(|| black_box(&breaker).would_admit())
    });
    c.bench_function("breaker/admit_record_contended_4_threads", |b| {
        b.iter_custom(|iters| contended(&closed_breaker(), iters))
    });
}

/// Wall time for every thread to do `iters` admit+record pairs on one shared breaker, so the
/// figure is per-operation latency under contention, not throughput.
fn contended(breaker: &Arc<CircuitBreaker>, iters: u64) -> Duration {
    let start = Arc::new(Barrier::new(CONTENDING_THREADS + 1));
    let workers: Vec<_> = (0..CONTENDING_THREADS)
        .map(|_| {
            let (breaker, start) = (Arc::clone(breaker), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    admit_record(&breaker);
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for worker in workers {
        if worker.join().is_err() {
            panic!("bench worker panicked");
        }
    }
    began.elapsed()
}

fn retry_budget_benches(c: &mut Criterion) {
    let budget = RetryBudget::new(
        RetryBudgetConfig::default(),
        Arc::new(MonotonicClock::new()),
    );
    c.bench_function("retry_budget/record_and_acquire", |b| {
        b.iter(|| {
            budget.record_request();
            black_box(budget.try_acquire_retry())
        })
    });
}

criterion_group!(benches, breaker_benches, retry_budget_benches);
criterion_main!(benches);
