//! Each uid's share of something (open connections, `govsql log` reads),
//! so no user can lock the others out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A count per uid with a limit: each uid's share of something.
pub struct PerUid {
    counts: Mutex<HashMap<u32, usize>>,
    limit: usize,
}

impl PerUid {
    /// A share of `limit` per uid.
    pub fn new(limit: usize) -> Arc<PerUid> {
        Arc::new(PerUid {
            counts: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// One more for `uid`, or None when it holds its share already.
    pub fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(uid).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            of: self.clone(),
            uid,
        })
    }
}

/// One unit of a uid's share; given back when dropped.
pub struct UidSlot {
    of: Arc<PerUid>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut map = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PerUid;

    #[test]
    fn each_uid_has_its_own_share_given_back_on_drop() {
        let reads = PerUid::new(2);
        let a1 = reads.take(1000).unwrap();
        let _a2 = reads.take(1000).unwrap();
        assert!(reads.take(1000).is_none(), "over its share");
        let _b = reads.take(1001).expect("another uid is not affected");
        drop(a1);
        assert!(reads.take(1000).is_some(), "given back");
    }
}
