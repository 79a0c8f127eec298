//! A QMP client for qemu-storage-daemon: QEMU's bitmap operations and its SHA-256 of a bitmap.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::json::{json_str, Json};
use crate::tempdir::{unique_number, TempDir};
use crate::tools::{short, split};

/// A running qemu-storage-daemon with a QMP monitor on a UNIX socket. The qcow2 node is "fmt0".
/// Dropping it kills the process (SIGKILL) if it is still running.
pub struct Qsd {
    child: Option<Child>,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    log: PathBuf,
}

/// QMP timeout for one reply.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

impl Qsd {
    /// Starts qemu-storage-daemon on `img` (cwd = the image's directory), read-only or not, and
    /// negotiates QMP capabilities. The socket and log live in `tmp`.
    pub fn start(img: &Path, read_only: bool, tmp: &TempDir) -> Qsd {
        let (dir, base) = split(img);
        let n = unique_number();
        let sock = tmp.join(&format!("qmp{n}.sock"));
        let log = tmp.join(&format!("qsd{n}.log"));
        let _ = std::fs::remove_file(&sock);
        let ro = if read_only { ",read-only=on" } else { "" };
        let file_arg = format!(
            "driver=file,filename={},node-name=file0{ro}",
            base.replace(',', ",,")
        );
        let fmt_arg = format!("driver=qcow2,file=file0,node-name=fmt0{ro}");
        let chardev = format!("socket,path={},server=on,wait=off,id=mon0", sock.display());
        let logf = std::fs::File::create(&log).expect("qsd log");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &file_arg,
                "--blockdev",
                &fmt_arg,
                "--chardev",
                &chardev,
                "--monitor",
                "chardev=mon0",
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-storage-daemon: {e}"));
        let mut child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "qemu-storage-daemon exited early ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!("qemu-storage-daemon: no QMP socket after 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).expect("timeout");
        stream
            .set_write_timeout(Some(QMP_TIMEOUT))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone socket"));
        let mut q = Qsd {
            child,
            stream,
            reader,
            log,
        };
        let greeting = q.read_msg();
        assert!(
            greeting.get("QMP").is_some(),
            "unexpected QMP greeting: {greeting:?}"
        );
        q.execute("qmp_capabilities", None)
            .expect("qmp_capabilities");
        q
    }

    fn read_msg(&mut self) -> Json {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap_or_else(|e| {
            panic!(
                "QMP read failed: {e}; daemon log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        assert!(
            n > 0,
            "QMP connection closed; daemon log: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        Json::parse(line.trim()).unwrap_or_else(|e| panic!("bad QMP message {line:?}: {e}"))
    }

    /// Sends a command (`args` is a JSON object text or None) and waits for its reply, skipping
    /// events. Ok(return value) or Err(the error's "desc").
    pub fn execute(&mut self, cmd: &str, args: Option<&str>) -> Result<Json, String> {
        let msg = match args {
            Some(a) => format!("{{\"execute\":{},\"arguments\":{a}}}\n", json_str(cmd)),
            None => format!("{{\"execute\":{}}}\n", json_str(cmd)),
        };
        self.stream.write_all(msg.as_bytes()).expect("QMP write");
        loop {
            let r = self.read_msg();
            // Events, and a repeated greeting: qemu-storage-daemon 10.0.2 sometimes greets a
            // client that connected while its monitor was starting twice (seen once in CI).
            if r.get("event").is_some() || r.get("QMP").is_some() {
                continue;
            }
            if let Some(v) = r.get("return") {
                return Ok(v.clone());
            }
            if let Some(e) = r.get("error") {
                return Err(e
                    .get("desc")
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_string());
            }
            panic!("unexpected QMP message: {r:?}");
        }
    }

    /// Like execute, panicking on an error.
    pub fn exec_ok(&mut self, cmd: &str, args: &str) -> Json {
        self.execute(cmd, Some(args))
            .unwrap_or_else(|e| panic!("QMP {cmd} {}: {e}", short(args)))
    }

    /// block-dirty-bitmap-add on fmt0.
    pub fn bitmap_add(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) {
        let mut a = format!(
            "{{\"node\":\"fmt0\",\"name\":{},\"persistent\":{persistent},\"disabled\":{disabled}",
            json_str(name)
        );
        if let Some(g) = granularity {
            let _ = write!(a, ",\"granularity\":{g}");
        }
        a.push('}');
        self.exec_ok("block-dirty-bitmap-add", &a);
    }

    /// x-debug-block-dirty-bitmap-sha256 on fmt0.
    pub fn sha256(&mut self, name: &str) -> String {
        let r = self.exec_ok(
            "x-debug-block-dirty-bitmap-sha256",
            &format!("{{\"node\":\"fmt0\",\"name\":{}}}", json_str(name)),
        );
        r.get("sha256")
            .and_then(Json::as_str)
            .expect("sha256 in reply")
            .to_string()
    }

    /// Sends quit and waits for the process to end (QEMU stores persistent bitmaps). The
    /// connection may close before or after the reply; both are fine.
    pub fn quit(mut self) {
        self.stream
            .write_all(b"{\"execute\":\"quit\"}\n")
            .expect("QMP write");
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.contains("\"return\"") => break,
                Ok(_) if line.contains("\"error\"") => panic!("QMP quit failed: {line}"),
                Ok(_) => continue,
            }
        }
        self.wait_exit(Duration::from_secs(20));
    }

    fn wait_exit(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "qemu-storage-daemon exit {status}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("qemu-storage-daemon did not exit after quit");
                }
            }
        }
    }

    /// Kills the daemon with SIGKILL (bitmaps loaded read-write stay in_use) and reaps it.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL qemu-storage-daemon");
            let _ = c.wait();
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// QEMU's SHA-256 of each named bitmap, from a read-only qemu-storage-daemon.
pub fn qemu_sha256s(img: &Path, names: &[String], tmp: &TempDir) -> BTreeMap<String, String> {
    let mut q = Qsd::start(img, true, tmp);
    let out = names.iter().map(|n| (n.clone(), q.sha256(n))).collect();
    q.quit();
    out
}
