//! Splits an encoded OTLP export request that is over the receiver's size limit into
//! several, by resource (field 1 of every Export*ServiceRequest), other fields copied.
//!
//! Works on the wire format, so one function serves metrics, profiles and traces: a
//! request is a sequence of fields, and a message made of any subset of its field-1
//! records plus every other field (the profiles' shared dictionary) is a valid request.

/// The requests to send, and the resources dropped because alone they were over the limit.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub parts: Vec<Vec<u8>>,
    pub dropped: usize,
}

/// `body` as requests of at most `limit` bytes each, by resource.
pub fn split(body: Vec<u8>, limit: usize) -> Split {
    if body.len() <= limit {
        return Split { parts: vec![body], dropped: 0 };
    }
    let Some((resources, common)) = fields(&body) else {
        // Not a protobuf message: nothing to split along, and the receiver would refuse it.
        return Split { parts: Vec::new(), dropped: 1 };
    };
    let mut out = Split::default();
    let mut part = common.clone();
    let mut in_part = 0;
    for resource in resources {
        if common.len() + resource.len() > limit {
            out.dropped += 1;
            continue;
        }
        if part.len() + resource.len() > limit {
            out.parts.push(std::mem::replace(&mut part, common.clone()));
            in_part = 0;
        }
        part.extend_from_slice(resource);
        in_part += 1;
    }
    if in_part > 0 {
        out.parts.push(part);
    }
    out
}

/// The field-1 records (tag, length and value) and every other record, concatenated.
fn fields(body: &[u8]) -> Option<(Vec<&[u8]>, Vec<u8>)> {
    let (mut resources, mut common) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < body.len() {
        let start = at;
        let tag = varint(body, &mut at)?;
        let len = match tag & 7 {
            0 => {
                varint(body, &mut at)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(body, &mut at)?).ok()?,
            5 => 4,
            _ => return None,
        };
        at = at.checked_add(len).filter(|&end| end <= body.len())?;
        if tag >> 3 == 1 && tag & 7 == 2 {
            resources.push(&body[start..at]);
        } else {
            common.extend_from_slice(&body[start..at]);
        }
    }
    Some((resources, common))
}

fn varint(body: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *body.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::{
            metrics::v1::ExportMetricsServiceRequest, profiles::v1development::ExportProfilesServiceRequest,
        },
        common::v1::{AnyValue, KeyValue, any_value},
        metrics::v1::ResourceMetrics,
        profiles::v1development::{ProfilesDictionary, ResourceProfiles},
        resource::v1::Resource,
    };
    use prost::Message;

    use super::*;

    fn resource(name: &str, size: usize) -> Option<Resource> {
        let value = AnyValue { value: Some(any_value::Value::StringValue(name.repeat(size))) };
        let attribute = KeyValue { key: "service.name".into(), value: Some(value), ..Default::default() };
        Some(Resource { attributes: vec![attribute], ..Default::default() })
    }

    fn metrics(sizes: &[(&str, usize)]) -> ExportMetricsServiceRequest {
        let resource_metrics = sizes
            .iter()
            .map(|&(n, s)| ResourceMetrics { resource: resource(n, s), ..Default::default() })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    fn names(part: &[u8]) -> Vec<char> {
        let request = ExportMetricsServiceRequest::decode(part).expect("a part decodes");
        let name = |r: &ResourceMetrics| match &r.resource.as_ref().unwrap().attributes[0].value {
            Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => s.chars().next().unwrap(),
            other => panic!("expected a string attribute, got {other:?}"),
        };
        request.resource_metrics.iter().map(name).collect()
    }

    #[test]
    fn a_small_request_goes_whole() {
        let body = metrics(&[("a", 10), ("b", 10)]).encode_to_vec();
        assert_eq!(split(body.clone(), 4 << 20), Split { parts: vec![body], dropped: 0 });
    }

    #[test]
    fn a_large_request_goes_by_resource_and_oversized_resources_are_dropped() {
        let body = metrics(&[("a", 400), ("b", 400), ("c", 5000), ("d", 300), ("e", 100)]).encode_to_vec();
        let out = split(body, 1000);
        assert_eq!(out.dropped, 1, "the 5000-byte resource alone is over the limit");
        assert!(out.parts.iter().all(|p| p.len() <= 1000), "every part within the limit");
        let parts: Vec<Vec<char>> = out.parts.iter().map(|p| names(p)).collect();
        assert_eq!(parts, [vec!['a', 'b'], vec!['d', 'e']]);
    }

    #[test]
    fn the_profiles_dictionary_goes_with_every_part() {
        let dictionary =
            ProfilesDictionary { string_table: vec!["".into(), "main".into()], ..Default::default() };
        let request = ExportProfilesServiceRequest {
            resource_profiles: ["a", "b", "c"]
                .iter()
                .map(|n| ResourceProfiles { resource: resource(n, 300), ..Default::default() })
                .collect(),
            dictionary: Some(dictionary.clone()),
        };
        let out = split(request.encode_to_vec(), 500);
        assert_eq!((out.parts.len(), out.dropped), (3, 0));
        for part in &out.parts {
            let p = ExportProfilesServiceRequest::decode(&part[..]).unwrap();
            assert_eq!(p.resource_profiles.len(), 1);
            assert_eq!(p.dictionary.as_ref(), Some(&dictionary), "each part carries the dictionary");
        }
    }

    #[test]
    fn garbage_is_dropped_not_sent() {
        assert_eq!(split(vec![0xff; 64], 16), Split { parts: Vec::new(), dropped: 1 });
    }
}
