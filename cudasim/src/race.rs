//! Race checking of shared memory (units compiled for it report each load and store).

use crate::exec::*;
use std::ffi::c_void;

pub(crate) const NONE: (u32, u32, u32) = (u32::MAX, 0, 0);

/// A load or store of shared memory, from a unit compiled for race checking: two accesses
/// to a word race when another thread made one of them, at least one is a write, and no
/// barrier (nor, within a warp, a warp collective) lies between them.
pub(crate) unsafe extern "C" fn api_access(p: *const c_void, size: usize, write: i32) {
    let b = &mut *CUR.get();
    if b.err.is_some() {
        return;
    }
    let me = b.cur as u32;
    let w = me as usize / 32;
    let now = (me, b.bar_epoch, b.warps[w].epoch);
    let conflicts = |o: (u32, u32, u32)| o.0 != u32::MAX && o.0 != me && o.1 == now.1 && (o.0 as usize / 32 != w || o.2 == now.2);
    let start = p as usize & !3;
    for word in (start..p as usize + size.max(1)).step_by(4) {
        let e = b.shadow.entry(word).or_insert([NONE, NONE]);
        let (last_w, last_r) = (e[0], e[1]);
        let hit = if conflicts(last_w) {
            Some((last_w.0, "write"))
        } else if write != 0 && conflicts(last_r) {
            Some((last_r.0, "read"))
        } else {
            None
        };
        if write != 0 { e[0] = now } else { e[1] = now }
        if let Some((other, what)) = hit {
            let (at, part) = match b.smem.iter().position(|&(s, n)| word >= s && word < s + n) {
                Some(0) => (word - b.smem[0].0, "static"),
                _ => (word - b.smem[1].0, "dynamic"),
            };
            let wh = b.where_(me as usize);
            let oc = &b.fibers[other as usize].ctx.tid;
            b.err = Some(format!(
                "shared-memory race in {wh}: its {} of {part} shared memory at offset {at} and the {what} by thread ({},{},{}) in the same barrier interval",
                if write != 0 { "write" } else { "read" },
                oc[0],
                oc[1],
                oc[2]
            ));
            return;
        }
    }
}
