//! The cargo-fuzz targets of fuzz/ as plain tests (stable toolchain, no libFuzzer): every file
//! of the committed corpus (fuzz/corpus/TARGET/) and the seeds qdirty builds are replayed, then
//! a deterministic mutation loop (bit flips, byte sets, interesting values, truncation,
//! extension, splices of big-endian fields) runs each target for a fixed number of inputs.
//! A panic anywhere is a finding. `QDIRTY_FUZZ_ITERS` scales the loop (default 1500, times 5 for the parsers).

mod common;

use common::{Prng, TempDir};
use qdirty_fuzz_targets as targets;

use std::path::Path;

const INTERESTING: &[u64] = &[
    0,
    1,
    7,
    8,
    9,
    21,
    22,
    24,
    31,
    32,
    63,
    64,
    104,
    112,
    255,
    256,
    511,
    512,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x0800_0000,
    0x2000_0000,
    67_107_840,
    1 << 40,
    (1 << 56) - 512,
    1 << 63,
    u64::MAX,
];

fn mutate(rng: &mut Prng, seed: &[u8], hot: &[usize]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.index(4) {
        if b.is_empty() {
            b.push(rng.next_u64() as u8);
            continue;
        }
        // Half of the mutations hit the structures (header, directory, tables), half anywhere.
        let pos = if !hot.is_empty() && rng.index(2) == 0 {
            (hot[rng.index(hot.len())] + rng.index(64)).min(b.len() - 1)
        } else {
            rng.index(b.len())
        };
        match rng.index(7) {
            0 => b[pos] ^= 1 << rng.index(8),
            1 => b[pos] = rng.next_u64() as u8,
            2 | 3 => {
                let v = INTERESTING[rng.index(INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.index(4)];
                let bytes = v.to_be_bytes();
                let start = pos & !(width - 1);
                for i in 0..width {
                    if start + i < b.len() {
                        b[start + i] = bytes[8 - width + i];
                    }
                }
            }
            4 => b.truncate(pos),
            5 => b.extend((0..rng.index(600)).map(|_| 0u8)),
            _ => {
                // Copy an 8-byte field somewhere else (offsets into other fields).
                let src = rng.index(b.len());
                let dst = rng.index(b.len());
                for i in 0..8 {
                    if src + i < b.len() && dst + i < b.len() {
                        b[dst + i] = b[src + i];
                    }
                }
            }
        }
    }
    b
}

/// Where a qcow2 image's structures are (cluster 0 and the cluster-aligned offsets the header
/// and bitmaps extension name), for the mutator.
fn hot_spots(b: &[u8]) -> Vec<usize> {
    let mut hot = vec![0, 72, 96];
    if b.len() < 112 {
        return hot;
    }
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    hot.push(be64(48));
    let mut pos = be32(100);
    for _ in 0..32 {
        if pos + 32 > b.len() || be32(pos) == 0 {
            break;
        }
        hot.push(pos);
        if be32(pos) == 0x2385_2875 {
            let doff = be64(pos + 24);
            hot.push(doff);
            if doff + 8 <= b.len() {
                hot.push(be64(doff));
            }
        }
        pos += 8 + be32(pos + 4).div_ceil(8) * 8;
    }
    hot.retain(|&h| h < b.len());
    hot
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            out.push(std::fs::read(p).unwrap());
        }
    }
    out
}

fn iters() -> usize {
    std::env::var("QDIRTY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn run(target: &str, f: fn(&[u8]), seed: u64, iters: usize) {
    let tmp = TempDir::new(&format!("fuzz-{target}"));
    let mut inputs: Vec<Vec<u8>> = targets::seeds(tmp.path())
        .into_iter()
        .filter(|(t, _)| *t == target)
        .map(|(_, d)| d)
        .collect();
    inputs.extend(corpus(target));
    assert!(!inputs.is_empty(), "no seeds for {target}");
    for i in &inputs {
        f(i);
    }
    let mut rng = Prng::new(seed);
    let hot: Vec<Vec<usize>> = inputs.iter().map(|b| hot_spots(b)).collect();
    for _ in 0..iters {
        let k = rng.index(inputs.len());
        let m = mutate(&mut rng, &inputs[k], &hot[k]);
        f(&m);
    }
}

#[test]
fn fuzz_replay_header_and_extensions() {
    run(
        "header",
        targets::header_and_extensions,
        0x1234_5678_9abc_def1,
        iters() * 5,
    );
}

#[test]
fn fuzz_replay_bitmap_directory() {
    run(
        "directory",
        targets::bitmap_directory,
        0x0bad_cafe_dead_beef,
        iters() * 5,
    );
}

#[test]
fn fuzz_replay_bitmap_table() {
    run(
        "table",
        targets::bitmap_table,
        0x5eed_0001_0002_0003,
        iters() * 5,
    );
}

#[test]
fn fuzz_replay_open_cycle() {
    run("open", targets::open_cycle, 0xfeed_face_0bad_f00d, iters());
}

/// Writes the seeds as the committed cargo-fuzz corpus (fuzz/corpus/TARGET/seed-N) when
/// `QDIRTY_FUZZ_WRITE_SEEDS=1`.
#[test]
fn fuzz_write_seeds() {
    if std::env::var("QDIRTY_FUZZ_WRITE_SEEDS").as_deref() != Ok("1") {
        return;
    }
    let tmp = TempDir::new("fuzz-seeds");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let map = |t: &str| match t {
        "header" => "header_and_extensions",
        "directory" => "bitmap_directory",
        "table" => "bitmap_table",
        _ => "open_cycle",
    };
    for (i, (t, d)) in targets::seeds(tmp.path()).into_iter().enumerate() {
        let dir = root.join(map(t));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{i}")), d).unwrap();
    }
}
