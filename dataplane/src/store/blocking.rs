//! A blocking driver for a shard: for tools, tests and benchmark setup, never for a
//! reactor (it spins on the device).

use sluice_nvme::BlockDevice;

use super::{Answer, Query, Shard, StoreError, StoreEvent, Transaction};

/// Polls `shard` until the event with `token` arrives; other events are kept in `other`.
fn wait<D: BlockDevice>(
    shard: &mut Shard<D>,
    token: u64,
    other: &mut Vec<StoreEvent>,
) -> StoreEvent {
    let mut found = None;
    let mut idle_spins = 0u64;
    while found.is_none() {
        let busy = shard.poll(&mut |e| {
            let t = match &e {
                StoreEvent::Txn { token, .. } | StoreEvent::Query { token, .. } => *token,
            };
            if t == token && found.is_none() {
                found = Some(e);
            } else {
                other.push(e);
            }
        });
        if !busy {
            idle_spins += 1;
            if idle_spins.is_multiple_of(1024) {
                std::thread::yield_now();
            }
        }
    }
    found.expect("loop exits with the event")
}

const TOKEN: u64 = u64::MAX - 7;

/// Runs one transaction to durability.
pub fn run_txn<D: BlockDevice>(shard: &mut Shard<D>, txn: Transaction) -> Result<u64, StoreError> {
    shard.submit(txn, TOKEN)?;
    let mut other = Vec::new();
    match wait(shard, TOKEN, &mut other) {
        StoreEvent::Txn { result, .. } => result,
        StoreEvent::Query { .. } => unreachable!("token belongs to a transaction"),
    }
}

/// Answers one query.
pub fn run_query<D: BlockDevice>(shard: &mut Shard<D>, q: Query) -> Result<Answer, StoreError> {
    shard.query(q, TOKEN);
    let mut other = Vec::new();
    match wait(shard, TOKEN, &mut other) {
        StoreEvent::Query { result, .. } => result,
        StoreEvent::Txn { .. } => unreachable!("token belongs to a query"),
    }
}

/// Polls until nothing is left to do (background work such as a checkpoint included).
pub fn settle<D: BlockDevice>(shard: &mut Shard<D>) {
    while !shard.is_idle() {
        if !shard.poll(&mut |_| {}) {
            std::thread::yield_now();
        }
    }
}
