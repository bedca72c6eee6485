//! Resource attributes of a sampled process: `service.name` (its own OTEL_SERVICE_NAME,
//! else its container's name, else its script or module), pid, executable, runtime.
use std::{fs, io::Read};

/// Most bytes read of a process's environment or command line (a target sets their size:
/// Linux allows a quarter of the stack limit, unbounded with `ulimit -s unlimited`).
const MAX_READ: u64 = 1 << 20;
/// Longest `service.name` kept: it becomes a label on every series of the process.
const MAX_NAME: usize = 256;

fn read_capped(path: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = fs::File::open(path) {
        let _ = file.take(MAX_READ).read_to_end(&mut bytes);
    }
    bytes
}

/// `name` cut to at most `MAX_NAME` bytes, on a character boundary.
fn capped(mut name: String) -> String {
    if name.len() > MAX_NAME {
        let end = (0..=MAX_NAME).rev().find(|&i| name.is_char_boundary(i)).unwrap_or(0);
        name.truncate(end);
    }
    name
}

/// `service.name` for process `pid`: its `OTEL_SERVICE_NAME` (or `service.name` in its
/// `OTEL_RESOURCE_ATTRIBUTES`), else `container`, else what its command line runs.
pub fn service_name(pid: u32, container: Option<&str>) -> String {
    capped(uncapped_service_name(pid, container))
}

fn uncapped_service_name(pid: u32, container: Option<&str>) -> String {
    let environ = read_capped(&format!("/proc/{pid}/environ"));
    if let Some(name) = service_from_environ(&environ) {
        return name;
    }
    if let Some(c) = container.filter(|c| !c.is_empty()) {
        return c.to_string();
    }
    let cmdline = read_capped(&format!("/proc/{pid}/cmdline"));
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into())
        .collect();
    service_from_args(&args).unwrap_or_else(|| crate::sys::process::comm(pid))
}

fn service_from_environ(environ: &[u8]) -> Option<String> {
    let vars = environ.split(|&b| b == 0).filter_map(|v| std::str::from_utf8(v).ok());
    let mut from_attributes = None;
    for var in vars {
        if let Some(name) = var.strip_prefix("OTEL_SERVICE_NAME=").filter(|n| !n.is_empty()) {
            return Some(name.to_string());
        }
        if let Some(attrs) = var.strip_prefix("OTEL_RESOURCE_ATTRIBUTES=") {
            from_attributes = attrs
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.trim() == "service.name")
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty());
        }
    }
    from_attributes
}

/// `python -m pkg.mod` -> `pkg.mod`; `python /srv/app/main.py` -> `main`; a console
/// script (`/venv/bin/gunicorn app:app`, argv[0] not python) -> `gunicorn`.
fn service_from_args(args: &[String]) -> Option<String> {
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let first = args.first()?;
    if !base(first).starts_with("python") {
        return Some(base(first));
    }
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-m" => return rest.next().cloned(),
            "-c" => return None,
            // Options that take a value.
            "-W" | "-X" | "-Q" => {
                rest.next();
            }
            a if a.starts_with('-') => {}
            script => {
                let name = base(script);
                return Some(name.strip_suffix(".py").unwrap_or(&name).to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        assert_eq!(capped("api".into()), "api");
        let long = "é".repeat(200); // 400 bytes
        let cut = capped(long);
        assert!(cut.len() <= MAX_NAME && cut.len() >= MAX_NAME - 1 && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn names_from_command_lines() {
        assert_eq!(
            service_from_args(&args(&["python3", "-m", "uvicorn", "app:app"])).as_deref(),
            Some("uvicorn")
        );
        assert_eq!(
            service_from_args(&args(&["/usr/bin/python3.11", "-u", "/srv/app/main.py"])).as_deref(),
            Some("main")
        );
        assert_eq!(service_from_args(&args(&["/venv/bin/gunicorn", "app:app"])).as_deref(), Some("gunicorn"));
        assert_eq!(
            service_from_args(&args(&["python3", "-X", "dev", "worker.py"])).as_deref(),
            Some("worker")
        );
        assert_eq!(service_from_args(&args(&["python3", "-c", "print(1)"])), None);
    }

    #[test]
    fn names_from_the_environment() {
        assert_eq!(service_from_environ(b"A=1\0OTEL_SERVICE_NAME=checkout\0").as_deref(), Some("checkout"));
        let attrs = b"OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod, service.name=cart\0";
        assert_eq!(service_from_environ(attrs).as_deref(), Some("cart"));
        assert_eq!(service_from_environ(b"PATH=/bin\0").as_deref(), None);
    }

    #[test]
    fn a_real_process_gets_its_own_service_name() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .env("OTEL_SERVICE_NAME", "sleeper")
            .spawn()
            .expect("run sleep");
        let bare =
            std::process::Command::new("sleep").arg("5").env_remove("OTEL_SERVICE_NAME").spawn().unwrap();
        // Until exec, /proc shows the forked test process, not sleep; exec names the task
        // before it lays out the new environment, so wait for both.
        for pid in [child.id(), bare.id()] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let execed = || {
                crate::sys::process::comm(pid) == "sleep"
                    && !fs::read(format!("/proc/{pid}/environ")).unwrap_or_default().is_empty()
            };
            while !execed() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let name = service_name(child.id(), Some("ignored"));
        let from_container = service_name(bare.id(), Some("web"));
        let from_args = service_name(bare.id(), None);
        for mut c in [child, bare] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(name, "sleeper");
        assert_eq!(from_container, "web");
        assert_eq!(from_args, "sleep");
    }
}
