//! The generated CRDs enforce what their descriptions promise, in the forms operators
//! expect: Kubernetes integer formats, ranges, enums, CEL rules, short names, the
//! `portico` category, scalar printer columns, a status subresource where there is a
//! status.

use portico_crds::crd_files;
use serde_json::Value;

fn crds() -> Vec<(String, Value)> {
    crd_files()
        .unwrap()
        .into_iter()
        .map(|(file, yaml)| {
            let v: Value = serde_saphyr::from_str(&yaml).unwrap();
            (file.to_owned(), v)
        })
        .collect()
}

fn crd(file: &str) -> Value {
    crds().into_iter().find(|(f, _)| f == file).unwrap().1
}

fn spec_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(v);
    match v {
        Value::Object(m) => m.values().for_each(|c| walk(c, out)),
        Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
        _ => {}
    }
}

#[test]
fn integers_use_the_formats_kubernetes_defines() {
    for (file, crd) in crds() {
        let mut all = Vec::new();
        walk(&crd, &mut all);
        for v in all {
            if v["type"] == "integer" {
                if let Some(f) = v.get("format").and_then(Value::as_str) {
                    assert!(["int32", "int64"].contains(&f), "{file}: format {f}");
                }
                for bound in ["minimum", "maximum"] {
                    if let Some(b) = v.get(bound) {
                        assert!(b.is_i64() || b.is_u64(), "{file}: {bound} {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_crd_has_a_short_name_and_the_portico_category() {
    for (file, crd) in crds() {
        let names = &crd["spec"]["names"];
        assert!(
            names["shortNames"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{file}"
        );
        assert_eq!(
            names["categories"],
            serde_json::json!(["portico"]),
            "{file}"
        );
    }
}

#[test]
fn printer_columns_print_scalars_and_kinds_with_status_have_the_subresource() {
    for (file, crd) in crds() {
        let version = &crd["spec"]["versions"][0];
        let schema = &version["schema"]["openAPIV3Schema"];
        for column in version["additionalPrinterColumns"].as_array().unwrap() {
            let path = column["jsonPath"].as_str().unwrap();
            if path.contains("[?(") || path.starts_with(".metadata") {
                continue;
            }
            let mut node = schema;
            for part in path.trim_start_matches('.').split('.') {
                node = &node["properties"][part];
            }
            assert!(
                ["string", "integer", "boolean", "number"]
                    .contains(&node["type"].as_str().unwrap_or("?")),
                "{file}: column {path} prints a {}",
                node["type"]
            );
        }
        if schema["properties"].get("status").is_some() {
            assert_eq!(
                version["subresources"]["status"],
                serde_json::json!({}),
                "{file}"
            );
        }
    }
}

#[test]
fn bgp_ranges_are_enforced_by_the_schema() {
    let adv = crd(portico_crds::BGP_ADVERTISEMENT_FILE);
    let s = spec_schema(&adv);
    assert_eq!(s["properties"]["aggregationLength"]["maximum"], 32);
    assert_eq!(s["properties"]["aggregationLengthV6"]["maximum"], 128);
    let peer = crd(portico_crds::BGP_PEER_FILE);
    let p = &spec_schema(&peer)["properties"];
    assert_eq!(p["ebgpMultihop"]["minimum"], 1);
    assert_eq!(p["ebgpMultihop"]["maximum"], 255);
    let rt = &p["gracefulRestart"]["properties"]["restartTime"];
    assert_eq!(
        (rt["minimum"].clone(), rt["maximum"].clone()),
        (1.into(), 4095.into())
    );
    assert_eq!(p["myASN"]["maximum"], 4_294_967_295_u64);
    assert_eq!(
        p["families"]["items"]["enum"],
        serde_json::json!(["ipv4-unicast", "ipv6-unicast"])
    );
    let rules = spec_schema(&peer)["x-kubernetes-validations"].to_string();
    assert!(
        rules.contains("keepaliveTime * 3 <= self.holdTime"),
        "{rules}"
    );
}

#[test]
fn address_blocks_are_cidr_or_start_and_stop_by_cel() {
    let pool = crd(portico_crds::ADDRESS_POOL_FILE);
    let block = &spec_schema(&pool)["properties"]["blocks"]["items"];
    let rules = block["x-kubernetes-validations"].to_string();
    for needle in ["isCIDR(self.cidr)", "isIP(self.start)", "family()"] {
        assert!(rules.contains(needle), "{needle} missing: {rules}");
    }
    assert_eq!(
        spec_schema(&pool)["properties"]["blocks"]["maxItems"],
        64,
        "bounded, so the CEL cost estimate stays within the API server's limit"
    );
}
