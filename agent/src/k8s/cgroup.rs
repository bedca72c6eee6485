//! Container identity from a process's cgroup paths: the 64-hex-digit id that Docker,
//! containerd, CRI-O and systemd-managed pods put in the path, on cgroup v1 and v2.

/// Parses /proc/PID/cgroup text (`hierarchy-id:controllers:path` per line).
pub fn container_id_from(cgroup: &str) -> Option<String> {
    cgroup.lines().filter_map(|line| line.splitn(3, ':').nth(2)).find_map(id_in_path)
}

/// The last path component that carries a container id, in any of the known shapes:
/// `/docker/<id>`, `/kubepods/burstable/pod<uid>/<id>`, `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-conmon-<id>.scope` (not the
/// container: skipped), `libpod-<id>.scope`.
fn id_in_path(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        if name.starts_with("crio-conmon-") {
            return None;
        }
        let candidate = name.rsplit(['-', ':']).next()?;
        is_container_id(candidate).then(|| candidate.to_string())
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The pod UID in a kubepods cgroup path (`pod<uid>` or `pod<uid with _>.slice`).
pub fn pod_uid_from(cgroup: &str) -> Option<String> {
    cgroup.lines().filter_map(|line| line.splitn(3, ':').nth(2)).find_map(|path| {
        path.split('/').find_map(|component| {
            let name = component.strip_suffix(".slice").unwrap_or(component);
            // `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>` (systemd).
            let pod = name.strip_prefix("pod").or_else(|| name.rsplit_once("-pod").map(|(_, rest)| rest))?;
            let uid = pod.replace('_', "-");
            (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4a1c2b9d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abcdef01";
    const UID: &str = "8b3c4d5e-6f70-4182-93a4-b5c6d7e8f901";

    #[test]
    fn docker_cgroup_v1() {
        let text = format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
    }

    #[test]
    fn docker_systemd_cgroup_v2() {
        let text = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
    }

    #[test]
    fn kubernetes_containerd_cgroupfs_v1() {
        let text = format!("4:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
        assert_eq!(pod_uid_from(&text).as_deref(), Some(UID));
    }

    #[test]
    fn kubernetes_containerd_systemd_v2() {
        let uid = UID.replace('-', "_");
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
        assert_eq!(pod_uid_from(&text).as_deref(), Some(UID));
    }

    #[test]
    fn kubernetes_crio_v2_skips_conmon() {
        let uid = UID.replace('-', "_");
        let conmon = format!("0::/kubepods.slice/kubepods-pod{uid}.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(container_id_from(&conmon), None, "conmon is not the container");
        let text = format!("0::/kubepods.slice/kubepods-pod{uid}.slice/crio-{ID}.scope\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
    }

    #[test]
    fn seen_from_another_cgroup_namespace() {
        // From inside a container with its own cgroup namespace (the agent's pod on cgroup
        // v2), other pods' paths are relative to it and climb out with `..`.
        let uid = UID.replace('-', "_");
        let text = format!("0::/../../kubepods-besteffort-pod{uid}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
        assert_eq!(pod_uid_from(&text).as_deref(), Some(UID));
    }

    #[test]
    fn podman_and_hosts_without_containers() {
        let text = format!("0::/machine.slice/libpod-{ID}.scope/container\n");
        assert_eq!(container_id_from(&text).as_deref(), Some(ID));
        assert_eq!(container_id_from("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(container_id_from("0::/init.scope\n"), None);
        assert_eq!(pod_uid_from("0::/system.slice/cron.service\n"), None);
        // A 64-character name that is not hex is not an id.
        let not_hex = "z".repeat(64);
        assert_eq!(container_id_from(&format!("0::/docker/{not_hex}\n")), None);
    }

    #[test]
    fn this_process_parses() {
        // Whatever this machine runs in, reading our own cgroup must not fail or panic.
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup file");
        let _ = container_id_from(&text);
    }
}
