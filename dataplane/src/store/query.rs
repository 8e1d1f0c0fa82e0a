//! Answering queries with committed state; the read path.

use sluice_nvme::{BlockDevice, Completion, DmaBuf, IoCommand};
use sluice_vocab::{BlockCount, Lba};

use super::format::BS;
use super::index::Loc;
use super::shard::{K_READ, Shard};
use super::{Answer, CollId, Missing, ObjectStat, Query, ReadData, StoreError, StoreEvent};

const BSU: u64 = BS as u64;

/// A contiguous run of blocks on disk inside a read.
#[derive(Debug)]
struct Run {
    /// Index of the run's first block within the read.
    at: usize,
    addr: u64,
    crcs: Vec<u32>,
}

/// A read in flight.
#[derive(Debug)]
pub(super) struct ReadOp {
    token: u64,
    coll: CollId,
    name: String,
    first_block: u64,
    result: Option<DmaBuf>,
    start: usize,
    len: usize,
    runs: Vec<Run>,
    left: usize,
    error: Option<StoreError>,
}

impl<D: BlockDevice> Shard<D> {
    /// Whether a query about `coll` (and `name`) must wait for staged changes.
    fn blocked(&self, coll: CollId, name: Option<&str>) -> bool {
        if self.pending.coll_set > 0 && self.pending.colls.contains_key(&coll) {
            return true;
        }
        match name {
            Some(n) => self.pending.objects.get(&coll).is_some_and(|m| m.contains_key(n)),
            None => self.pending.colls.contains_key(&coll),
        }
    }

    /// Answers every waiting query that no longer waits for staged changes.
    pub(super) fn answer_queries(&mut self) -> bool {
        let mut busy = false;
        let n = self.waiting.len();
        for _ in 0..n {
            let (token, q) = self.waiting.pop_front().expect("counted");
            let blocked = match &q {
                Query::Read { coll, name, .. }
                | Query::Stat { coll, name }
                | Query::GetXattr { coll, name, .. }
                | Query::GetXattrs { coll, name } => self.blocked(*coll, Some(name)),
                Query::List { coll, .. } | Query::PgLog { coll, .. } => self.blocked(*coll, None),
                Query::ListCollections => self.pending.coll_set > 0,
            };
            if blocked {
                self.waiting.push_back((token, q));
                continue;
            }
            busy = true;
            if let Some(result) = self.answer(token, q) {
                self.events.push_back(StoreEvent::Query { token, result });
            }
        }
        busy
    }

    /// Answers at once, or starts a device read (returns `None`).
    fn answer(&mut self, token: u64, q: Query) -> Option<Result<Answer, StoreError>> {
        let ix = &self.st.index;
        let no_coll = |c: CollId| StoreError::NotFound(Missing::Collection(c));
        let object = |c: CollId, n: &str| {
            let coll = ix.colls.get(&c).ok_or(no_coll(c))?;
            coll.objects
                .get(n)
                .ok_or_else(|| StoreError::NotFound(Missing::Object(c, n.to_string())))
        };
        Some(match q {
            Query::Stat { coll, name } => object(coll, &name)
                .map(|o| Answer::Stat(ObjectStat { size: o.size, version: o.version })),
            Query::GetXattr { coll, name, key } => object(coll, &name).and_then(|o| {
                o.xattrs
                    .get(&key)
                    .map(|v| Answer::Xattr(v.clone()))
                    .ok_or(StoreError::NotFound(Missing::Xattr(coll, name.clone(), key)))
            }),
            Query::GetXattrs { coll, name } => {
                object(coll, &name).map(|o| Answer::Xattrs(o.xattrs.clone()))
            }
            Query::List { coll, after, max } => ix.colls.get(&coll).ok_or(no_coll(coll)).map(|c| {
                let mut it = c.objects.names_after(after.as_deref()).map(str::to_string);
                let names: Vec<String> = it.by_ref().take(max).collect();
                let next = if it.next().is_some() { names.last().cloned() } else { None };
                Answer::List { names, next }
            }),
            Query::ListCollections => Ok(Answer::Collections(ix.colls.keys().copied().collect())),
            Query::PgLog { coll, after, max } => {
                ix.colls.get(&coll).ok_or(no_coll(coll)).map(|c| {
                    let from = after.map_or(0, |a| a.saturating_add(1));
                    Answer::PgLog(
                        c.pglog.range(from..).take(max).map(|(k, v)| (*k, v.clone())).collect(),
                    )
                })
            }
            Query::Read { coll, name, offset, len } => {
                let o = match object(coll, &name) {
                    Ok(o) => o,
                    Err(e) => return Some(Err(e)),
                };
                let end = offset.saturating_add(len).min(o.size);
                if offset >= end {
                    return Some(Ok(Answer::Data(ReadData::empty())));
                }
                let (fb, lb) = (offset / BSU, (end - 1) / BSU);
                let nblocks = (lb - fb + 1) as usize;
                let mut runs: Vec<Run> = Vec::new();
                for b in fb..=lb {
                    if let Some(r) = o.blocks.get(&b) {
                        let Loc::Disk(addr) = r.loc else {
                            panic!("committed read found a pending block")
                        };
                        let at = (b - fb) as usize;
                        match runs.last_mut() {
                            Some(run)
                                if run.addr + run.crcs.len() as u64 == addr
                                    && run.at + run.crcs.len() == at
                                    && run.crcs.len() < 256 =>
                            {
                                run.crcs.push(r.crc)
                            }
                            _ => runs.push(Run { at, addr, crcs: vec![r.crc] }),
                        }
                    }
                }
                let mut result = match self.read_pool.alloc() {
                    Some(mut b) if nblocks * BS <= b.capacity() => {
                        b.set_len(nblocks * BS);
                        b
                    }
                    _ => DmaBuf::new(nblocks * BS),
                };
                let start = (offset - fb * BSU) as usize;
                let len = (end - offset) as usize;
                self.stats.reads += 1;
                if runs.is_empty() {
                    result.fill(0);
                    return Some(Ok(Answer::Data(ReadData::new(result, start, len))));
                }
                let direct = runs.len() == 1 && runs[0].crcs.len() == nblocks;
                if !direct {
                    // Holes read as zeroes; runs are copied in as they arrive.
                    result.fill(0);
                }
                let slot = self.free_reads.pop().unwrap_or_else(|| {
                    self.reads.push(None);
                    self.reads.len() - 1
                });
                let mut cmds = Vec::with_capacity(runs.len());
                let mut result = Some(result);
                for (i, run) in runs.iter().enumerate() {
                    let n = run.crcs.len() as u64;
                    let buf = if direct {
                        result.take().expect("one run")
                    } else {
                        DmaBuf::new(n as usize * BS)
                    };
                    cmds.push((
                        IoCommand::Read { lba: Lba(run.addr), blocks: BlockCount(n) },
                        buf,
                        K_READ | ((slot as u64) << 16) | i as u64,
                    ));
                }
                let left = runs.len();
                self.reads[slot] = Some(ReadOp {
                    token,
                    coll,
                    name,
                    first_block: fb,
                    result,
                    start,
                    len,
                    runs,
                    left,
                    error: None,
                });
                for (cmd, buf, tag) in cmds {
                    self.io(cmd, Some(buf), tag);
                }
                return None;
            }
        })
    }

    pub(super) fn on_read(&mut self, id: u64, c: Completion) {
        let (slot, run_i) = ((id >> 16) as usize, (id & 0xffff) as usize);
        let op = self.reads[slot].as_mut().expect("read in flight");
        op.left -= 1;
        match c.result {
            Err(e) => {
                op.error.get_or_insert(StoreError::Io(e));
            }
            Ok(()) => {
                let buf = c.buf.expect("read buffer");
                let run = &op.runs[run_i];
                for (j, crc) in run.crcs.iter().enumerate() {
                    if crc32c::crc32c(&buf[j * BS..(j + 1) * BS]) != *crc {
                        let block = op.first_block + (run.at + j) as u64;
                        let e = StoreError::Corrupt {
                            coll: op.coll,
                            name: op.name.clone(),
                            offset: block * BSU,
                        };
                        // Report the lowest corrupt offset.
                        match &op.error {
                            Some(StoreError::Corrupt { offset, .. }) if *offset <= block * BSU => {}
                            _ => op.error = Some(e),
                        }
                        break;
                    }
                }
                match op.result.as_mut() {
                    Some(result) => {
                        let at = run.at * BS;
                        result[at..at + buf.len()].copy_from_slice(&buf);
                    }
                    None => op.result = Some(buf),
                }
            }
        }
        if op.left > 0 {
            return;
        }
        let op = self.reads[slot].take().expect("read in flight");
        self.free_reads.push(slot);
        let result = match op.error {
            Some(e) => Err(e),
            None => {
                Ok(Answer::Data(ReadData::new(op.result.expect("read result"), op.start, op.len)))
            }
        };
        self.events.push_back(StoreEvent::Query { token: op.token, result });
    }
}
