//! Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`): one function per parser of
//! target-controlled or external data, taking arbitrary bytes; none may panic, hang or balloon.
use std::{io::Cursor, path::Path};

use agent_ebpf::NetEvent;
use object::{Object, ObjectSegment};

use crate::{
    k8s::{
        cgroup,
        pods::{self, Placement, PodIndex},
    },
    net::{aggregate::Aggregator, spans::SpanSampler},
    node::{
        config::AgentConfig,
        export::endpoints::{self, Signal},
    },
    python::{
        code, detect,
        layout::{self, Layout, PyVersion},
        linetable,
        mem::{Image, ReadMemory},
    },
    sys::{btf::Btf, maps},
};

/// Byte offsets asked of every line table: the ends of the range and a few in between.
const LINE_OFFSETS: [u32; 6] = [0, 2, 6, 64, 4096, u32::MAX];

/// `[format selector, first line (4 bytes LE), byte offset (4 bytes LE), table...]`: the
/// line of that offset (and of a few fixed ones) in a table of the selected format.
pub fn linetable(data: &[u8]) {
    let Some((&[selector, l0, l1, l2, l3, o0, o1, o2, o3], table)) = data.split_first_chunk::<9>() else {
        return;
    };
    let format = linetable::format_for([9, 10, 11][usize::from(selector % 3)]);
    let first_line = u32::from_le_bytes([l0, l1, l2, l3]);
    let offset = u32::from_le_bytes([o0, o1, o2, o3]);
    for byte_offset in LINE_OFFSETS.into_iter().chain([offset]) {
        linetable::line_for(format, table, first_line, byte_offset);
    }
}

/// `[minor version, bytes of _PyRuntime...]`: the layout read from a 3.`minor`
/// `_Py_DebugOffsets`.
pub fn debug_offsets(data: &[u8]) {
    let Some((&minor, runtime)) = data.split_first() else { return };
    let _ = layout::layout_from_debug_offsets(PyVersion { major: 3, minor, patch: 0 }, runtime);
}

/// A BTF blob: the offsets the Python walker asks of it.
pub fn btf(data: &[u8]) {
    let Ok(btf) = Btf::parse(data, &["task_struct", "thread_struct", "list_head"]) else { return };
    crate::sys::btf::fsbase_offset(&btf);
    btf.member_offset("list_head", "next");
}

/// /proc/PID/maps text, read as a whole and line by line.
pub fn proc_maps(data: &[u8]) {
    let _ = maps::parse_from(data);
    for line in String::from_utf8_lossy(data).lines() {
        maps::parse_line(line);
    }
}

/// Where the fake interpreter ELF of [`detect_elf`] is mapped.
const MAP_START: u64 = 0x7f00_0000_0000;

/// `[map offset / 4096, ELF file...]`: what CPython detection makes of a process that mapped
/// that file at `MAP_START` from that offset, its memory being the file's loaded segments.
pub fn detect_elf(data: &[u8]) {
    let Some((&page, elf)) = data.split_first() else { return };
    let memory = Loaded::new(elf);
    let file = object::ReadCache::new(Cursor::new(elf));
    let path = Path::new("/usr/lib/libpython3.9.so.1.0");
    detect::inspect_elf(1, &file, path, MAP_START, u64::from(page) * 4096, &memory);
}

/// An ELF file's loadable segments as the dynamic loader would place them at `MAP_START`
/// (bias taken from the lowest segment), zero-filled past their file contents.
struct Loaded<'a> {
    file: &'a [u8],
    bias: u64,
    /// (link address, size in memory, file offset, size in the file)
    segments: Vec<(u64, u64, u64, u64)>,
}

impl<'a> Loaded<'a> {
    fn new(file: &'a [u8]) -> Self {
        let segments: Vec<_> = object::File::parse(file)
            .map(|f| {
                f.segments()
                    .map(|s| {
                        let (offset, filesz) = s.file_range();
                        (s.address(), s.size(), offset, filesz)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let lowest = segments.iter().map(|s| s.0).min().unwrap_or(0);
        Self { file, bias: MAP_START.wrapping_sub(lowest & !0xfff), segments }
    }
}

impl ReadMemory for Loaded<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let fault = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "not mapped");
        let at = addr.wrapping_sub(self.bias);
        let len = buf.len() as u64;
        let &(start, _, offset, filesz) = self
            .segments
            .iter()
            .find(|&&(start, memsz, _, _)| at >= start && len <= memsz && at - start <= memsz - len)
            .ok_or_else(fault)?;
        buf.fill(0);
        let into = at - start;
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = into + i as u64;
            if pos >= filesz {
                break;
            }
            let file_pos = usize::try_from(offset.saturating_add(pos)).map_err(|_| fault())?;
            *b = *self.file.get(file_pos).ok_or_else(fault)?;
        }
        Ok(())
    }
}

/// `[version selector, memory from address 0...]`: the code object at address 0 of that
/// memory, read with the layout of CPython 3.8-3.14 (by the selector), and its lines.
pub fn code_object(data: &[u8]) {
    let Some((&selector, memory)) = data.split_first() else { return };
    let (minor, layout) = code_layout(selector);
    let image = Image { base: 0, bytes: memory };
    if let Ok(info) = code::read_code(&image, &layout, linetable::format_for(minor), 0) {
        for offset in LINE_OFFSETS {
            info.line(offset);
        }
    }
}

fn code_layout(selector: u8) -> (u8, Layout) {
    let minor = 8 + selector % 7;
    let layout = layout::layout_for(PyVersion { major: 3, minor, patch: 0 }).expect("3.8-3.14 have a layout");
    (minor, layout)
}

/// An input for [`code_object`]: a code object of CPython 3.`minor` with these fields, its
/// strings compact (ASCII when they are) and its line table a `bytes` object.
pub fn code_object_image(minor: u8, name: &str, filename: &str, first_line: u32, table: &[u8]) -> Vec<u8> {
    let (_, l) = code_layout(minor - 8);
    let mut memory = vec![0u8; 256];
    let put = |memory: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        let at = at as usize;
        if memory.len() < at + bytes.len() {
            memory.resize(at + bytes.len(), 0);
        }
        memory[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let string = |memory: &mut Vec<u8>, s: &str| -> u64 {
        let at = memory.len().next_multiple_of(8) as u64;
        let ascii = s.is_ascii();
        let text: Vec<u8> = match ascii {
            true => s.as_bytes().to_vec(),
            false => s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect(),
        };
        let kind = if ascii { 1 } else { 4 };
        let state = (kind << layout::UNICODE_STATE_KIND_SHIFT)
            | layout::UNICODE_STATE_COMPACT_MASK
            | if ascii { layout::UNICODE_STATE_ASCII_MASK } else { 0 };
        put(memory, at + l.unicode_state, &state.to_le_bytes());
        put(memory, at + l.unicode_length, &(s.chars().count() as u64).to_le_bytes());
        let data = if ascii { l.unicode_ascii_data } else { l.unicode_compact_data };
        put(memory, at + data, &text);
        put(memory, at + data + text.len() as u64, &[0; 4]);
        at
    };
    let name_at = string(&mut memory, name);
    let filename_at = string(&mut memory, filename);
    let table_at = memory.len().next_multiple_of(8) as u64;
    put(&mut memory, table_at + l.bytes_size, &(table.len() as u64).to_le_bytes());
    put(&mut memory, table_at + l.bytes_data, table);
    put(&mut memory, l.code_qualname.unwrap_or(l.code_name), &name_at.to_le_bytes());
    put(&mut memory, l.code_filename, &filename_at.to_le_bytes());
    put(&mut memory, l.code_firstlineno, &first_line.to_le_bytes());
    put(&mut memory, l.code_linetable, &table_at.to_le_bytes());
    [&[minor - 8][..], &memory].concat()
}

/// A `PodList` body: the index built from it, asked for every container and pod it lists.
pub fn pod_list(data: &[u8]) {
    let Ok(pods) = pods::parse_pod_list(data) else { return };
    let index = PodIndex::new(pods.clone());
    for pod in &pods {
        for (_, id) in &pod.containers {
            index.find(&Placement { container_id: id.clone(), pod_uid: None });
        }
        index.find(&Placement { container_id: None, pod_uid: Some(pod.uid.clone()) });
    }
}

/// /proc/PID/cgroup text: the container id and pod UID in it.
pub fn cgroup(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    cgroup::container_id_from(&text);
    cgroup::pod_uid_from(&text);
}

/// An agent configuration file, then (after each NUL byte) a `--set key.path=value`.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let file = parts.next().unwrap_or_default();
    let overrides: Vec<String> = parts.map(String::from).collect();
    if let Ok(config) = AgentConfig::parse_with(file, &overrides) {
        let _ = config.validate();
        config.export_limits();
    }
}

/// `NAME=value` lines, the environment of the OTLP endpoint resolution (every signal), and
/// the whole text as an OTEL_EXPORTER_OTLP_HEADERS value.
pub fn otlp_env(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = endpoints::parse_headers(&text);
    let vars: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    for signal in [Signal::Metrics, Signal::Profiles, Signal::Traces, Signal::Logs] {
        let _ = endpoints::resolve(signal, &env);
    }
}

/// Kernel network events, back to back: their aggregation, spans and the summaries the
/// exporters read.
pub fn net_events(data: &[u8]) {
    let mut aggregator = Aggregator::new();
    aggregator.spans = Some(SpanSampler::new(0.5, 1_000_000, 16));
    for chunk in data.chunks_exact(size_of::<NetEvent>()) {
        // SAFETY: `chunk` holds size_of::<NetEvent>() bytes, read unaligned; NetEvent is
        // integers and byte arrays, so any bytes are a valid value.
        let event = unsafe { chunk.as_ptr().cast::<NetEvent>().read_unaligned() };
        aggregator.add(&event);
    }
    let metrics = aggregator.take_interval();
    for stats in metrics.requests.values() {
        stats.latency.quantiles();
        stats.latency.bucket_counts(&[0.001, 0.1, 1.0]);
    }
    for stats in metrics.connects.values() {
        for h in [&stats.latency, &stats.rtt, &stats.lifetime] {
            h.quantiles();
        }
    }
    if let Some(spans) = aggregator.spans.as_mut() {
        spans.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_object_images_read_back() {
        for minor in 8..=14 {
            let table = [0x80, 0x00, 0xd8, 0x04];
            let image = code_object_image(minor, "Handler.get", "/srv/app/vü.py", 42, &table);
            let (_, layout) = code_layout(image[0]);
            let memory = Image { base: 0, bytes: &image[1..] };
            let info = code::read_code(&memory, &layout, linetable::format_for(minor), 0).unwrap();
            assert_eq!(
                (info.name.as_str(), info.filename.as_str(), info.first_line),
                ("Handler.get", "/srv/app/vü.py", 42),
                "3.{minor}"
            );
            code_object(&image);
        }
    }
}
