//! qdirty's main job on an image it makes itself: create a qcow2 image, track writes in
//! persistent dirty bitmaps, store them, load them again, and show QEMU's rules happening
//! (auto = enabled, in_use while open for writing, inconsistent after a crash).
//!
//! Run: `cargo run --release --example quickstart [DIR]`

use std::path::PathBuf;
use std::process::Command;

use qdirty::{AddOptions, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--crash-child" {
        // A process that opens the image read-write and dies without closing it: the bitmaps
        // stay marked in_use on disk (its image locks go away with the process).
        let _img = Image::open(&args[2], true)?;
        std::process::exit(0);
    }
    let dir = args.get(1).map(PathBuf::from).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("qdirty-quickstart-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("disk.qcow2");
    let _ = std::fs::remove_file(&path);
    qdirty::warning::set_warning_handler(Some(Box::new(|m| println!("   warning: {m}"))));

    const GIB: u64 = 1 << 30;
    println!("1. create a 10 GiB qcow2 v3 image: {}", path.display());
    Image::create(&path, 10 * GIB, 65536)?;

    println!("2. open it read-write and add bitmaps (QMP block-dirty-bitmap-add semantics)");
    let mut img = Image::open(&path, true)?;
    let persistent = AddOptions {
        persistent: true,
        ..Default::default()
    };
    img.add_bitmap(b"daily", 0, persistent)?;
    img.add_bitmap(
        b"frozen",
        0,
        AddOptions {
            disabled: true,
            ..persistent
        },
    )?;
    img.add_bitmap(b"transient", 1 << 20, AddOptions::default())?;
    println!("   adding with the deprecated autoload option:");
    img.add_bitmap(
        b"legacy",
        0,
        AddOptions {
            autoload: Some(true),
            ..persistent
        },
    )?;
    show(&mut img, "   ")?;

    println!("3. the guest writes 4 KiB at 1 GiB and 1 MiB at 5 GiB (the write hook)");
    img.set_dirty(GIB, 4096);
    img.set_dirty(5 * GIB, 1 << 20);
    show(&mut img, "   ")?;

    println!("4. close: enabled bitmaps are stored with 'auto', disabled ones without it,");
    println!("   transient ones are dropped");
    img.close()?;
    qemu_img(&["info", "--output=human"], &path);

    println!("5. open read-write again: every bitmap loads (disabled ones disabled) and is");
    println!("   marked in_use on disk while the image is open");
    let mut img = Image::open(&path, true)?;
    show(&mut img, "   ")?;
    qemu_img(&["info", "-U"], &path);
    img.close()?;

    println!("6. a process opens it read-write and dies without closing: nothing is stored");
    let status = Command::new(std::env::current_exe()?)
        .arg("--crash-child")
        .arg(&path)
        .status()?;
    assert!(
        status.success(),
        "the crashing child could not open the image"
    );

    println!("7. the next open finds the bitmaps in_use and lists them as inconsistent");
    let mut img = Image::open(&path, true)?;
    show(&mut img, "   ")?;
    let id = img.find_bitmap(b"daily").expect("listed");
    if let Err(e) = img.bitmap_mut(id).expect("exists").clear() {
        println!("   clear fails: {e}");
        if let Some(h) = e.hint() {
            println!("   hint: {h}");
        }
    }
    println!("8. removing them is the only operation allowed; then start a new chain");
    for name in ["daily", "frozen", "legacy"] {
        img.remove_bitmap(name.as_bytes())?;
    }
    img.add_bitmap(b"daily", 0, persistent)?;
    img.close()?;
    qemu_img(&["check"], &path);
    qemu_img(&["info"], &path);
    println!("done: {}", path.display());
    Ok(())
}

fn show(img: &mut Image, indent: &str) -> Result<(), Box<dyn std::error::Error>> {
    for id in img.bitmap_ids() {
        let b = img.bitmap_current(id)?;
        // An inconsistent bitmap has no usable content: say so instead of a count.
        let dirty = match b.dirty_runs(0, b.size()) {
            Ok(runs) => format!("dirty {} bytes", runs.map(|(_, l)| l).sum::<u64>()),
            Err(_) => "INCONSISTENT (unusable)".to_string(),
        };
        println!(
            "{indent}{:<10} granularity {:>7}  {:<8} {:<10} {dirty}",
            b.display_name(),
            b.granularity(),
            if b.enabled() { "enabled" } else { "disabled" },
            if b.persistent() {
                "persistent"
            } else {
                "transient"
            },
        );
    }
    Ok(())
}

/// Shows what QEMU's own tool sees, when it is installed.
fn qemu_img(args: &[&str], path: &std::path::Path) {
    match Command::new("qemu-img").args(args).arg(path).output() {
        Ok(out) => {
            println!("   $ qemu-img {} {}", args.join(" "), path.display());
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("   | {line}");
            }
            for line in String::from_utf8_lossy(&out.stderr).lines() {
                println!("   | {line}");
            }
        }
        Err(_) => println!("   (qemu-img is not installed: skipping the QEMU view)"),
    }
}
