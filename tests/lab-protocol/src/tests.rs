use super::*;

fn vm(name: &str, per_page: bool) -> VmTruth {
    VmTruth {
        name: name.into(),
        pid: 412,
        bytes_per_node: vec![1 << 30, 0, 4096, 0],
        vcpu_ticks_per_node: vec![250, 0, 3, 0],
        vcpu_nodes: vec![0, 0],
        main_node: Some(0),
        locality: 0.75,
        touches_per_vcpu_s: 1.5e6,
        hot_locality: per_page.then_some(0.875),
        cold_locality: per_page.then_some(0.5),
        pages_moved: per_page.then_some(12),
        queried_present_share: per_page.then_some(1.0),
        access_locality: per_page.then_some(0.859375),
        offnode_accesses_per_s: per_page.then_some(421875.0),
        cells: Vec::new(),
    }
}

#[test]
fn cells_round_trip_and_stay_out_when_empty() {
    let mut v = vm("wide", true);
    assert!(!serde_json::to_string(&v).unwrap().contains("cells"));
    v.cells = vec![CellTruth {
        id: 1,
        bytes_per_node: vec![0, 512 << 20, 0, 0],
        main_node: Some(1),
        locality: 1.0,
        access_locality: Some(0.99),
    }];
    let text = serde_json::to_string(&v).unwrap();
    assert_eq!(serde_json::from_str::<VmTruth>(&text).unwrap(), v);
}

fn sample() -> Sample {
    Sample {
        t_s: 5.0,
        locality_mean: 0.625,
        locality_min: 0.25,
        vcpu_load_per_node: vec![2.0, 0.5, 0.0, 0.0],
        vms: vec![vm("vm0", false), vm("vm1", true)],
        access_locality_mean: Some(0.859375),
        hot_locality_mean: Some(0.875),
        offnode_accesses_per_s: Some(421875.0),
    }
}

fn summary() -> Summary {
    Summary {
        balancer: "vmbalancer".into(),
        kernel: "6.1".into(),
        vms: 2,
        locality: vec![(0.0, 0.25), (5.0, 0.625), (10.0, 0.96875)],
        time_to_090_s: Some(10.0),
        time_to_095_s: None,
        numa_pages_migrated: 7,
        pgmigrate_success: u64::MAX,
        cpu_balance: 0.5,
        work_touches: 123_456_789,
        touches_per_vcpu_s: 1000.0,
        run_s: 60.0,
        access_locality: vec![(0.0, 0.25), (5.0, 0.859375)],
        hot_locality: vec![(0.0, 0.25), (5.0, 0.875)],
        offnode_accesses_per_s: vec![(0.0, 2e6), (5.0, 421875.0)],
        access_time_to_095_s: None,
        hot_time_to_095_s: Some(10.0),
        first_cpu_move_affinity_s: Some(1.25),
        first_cpu_move_status_s: None,
        tick_late_moving_s: None,
        balancer_cpu_s: None,
    }
}

/// One record of each type the harness writes.
fn every_record() -> Vec<Record> {
    vec![
        Record::Start {
            scenario: "spread".into(),
            balancer: "numad".into(),
            kernel: "6.1".into(),
        },
        Record::Check {
            name: "locality >= 0.9".into(),
            ok: false,
            allowed_failure: true,
            detail: "0.85 at t=60 s".into(),
        },
        Record::Sample(sample()),
        Record::Event {
            source: "numad".into(),
            text: "Advising pid 412 (qemu-kvm) move from nodes (0-3) to nodes (1)".into(),
        },
        Record::Summary(Box::new(summary())),
        Record::Capture {
            path: "proc/412/numa_maps".into(),
            data: "7f00 default anon=3 N0=3 kernelpagesize_kB=4\n".into(),
        },
        Record::Done {
            ok: false,
            failed: vec!["nodes == 5".into(), "quoted \"name\" \\ ü".into()],
        },
    ]
}

#[test]
fn every_record_type_round_trips_through_a_console_line() {
    for record in every_record() {
        let line = record.line();
        assert!(line.starts_with(PREFIX), "{line}");
        assert!(!line.contains('\n'), "one record, one line: {line}");
        assert_eq!(parse_line(&line).unwrap(), Some(record.clone()));
        // As the host sees it: a serial console ends lines with CR LF and the
        // firmware may leave escape sequences in front of the first one.
        let console = format!("\x1b[2J{line}\r");
        assert_eq!(parse_line(&console).unwrap(), Some(record));
    }
}

#[test]
fn wire_format_is_stable() {
    // The exact text older and newer builds exchange: type tags in snake_case,
    // per-page truth left out when absent, tuples as arrays, None as null.
    let mut sum = Summary {
        access_locality: vec![],
        hot_locality: vec![],
        offnode_accesses_per_s: vec![],
        hot_time_to_095_s: None,
        first_cpu_move_affinity_s: None,
        ..summary()
    };
    sum.locality = vec![(0.0, 0.5)];
    let sample = Sample {
        vms: vec![VmTruth {
            main_node: None,
            ..vm("vm0", false)
        }],
        access_locality_mean: None,
        hot_locality_mean: None,
        offnode_accesses_per_s: None,
        ..sample()
    };
    let golden = [
        (
            Record::Start {
                scenario: "a".into(),
                balancer: "b".into(),
                kernel: "k".into(),
            },
            r#"{"type":"start","scenario":"a","balancer":"b","kernel":"k"}"#,
        ),
        (
            Record::Check {
                name: "n".into(),
                ok: true,
                allowed_failure: false,
                detail: "d".into(),
            },
            r#"{"type":"check","name":"n","ok":true,"allowed_failure":false,"detail":"d"}"#,
        ),
        (
            Record::Sample(sample),
            concat!(
                r#"{"type":"sample","t_s":5.0,"locality_mean":0.625,"locality_min":0.25,"#,
                r#""vcpu_load_per_node":[2.0,0.5,0.0,0.0],"vms":[{"name":"vm0","pid":412,"#,
                r#""bytes_per_node":[1073741824,0,4096,0],"vcpu_ticks_per_node":[250,0,3,0],"#,
                r#""vcpu_nodes":[0,0],"main_node":null,"locality":0.75,"#,
                r#""touches_per_vcpu_s":1500000.0}]}"#
            ),
        ),
        (
            Record::Event {
                source: "s".into(),
                text: "t".into(),
            },
            r#"{"type":"event","source":"s","text":"t"}"#,
        ),
        (
            Record::Summary(Box::new(sum)),
            concat!(
                r#"{"type":"summary","balancer":"vmbalancer","kernel":"6.1","vms":2,"#,
                r#""locality":[[0.0,0.5]],"time_to_090_s":10.0,"time_to_095_s":null,"#,
                r#""numa_pages_migrated":7,"pgmigrate_success":18446744073709551615,"#,
                r#""cpu_balance":0.5,"work_touches":123456789,"touches_per_vcpu_s":1000.0,"#,
                r#""run_s":60.0}"#
            ),
        ),
        (
            Record::Capture {
                path: "p".into(),
                data: "d".into(),
            },
            r#"{"type":"capture","path":"p","data":"d"}"#,
        ),
        (
            Record::Done {
                ok: true,
                failed: vec![],
            },
            r#"{"type":"done","ok":true,"failed":[]}"#,
        ),
    ];
    for (record, json) in golden {
        assert_eq!(record.line(), format!("@@VMBLAB@@ {json}"));
    }
}

#[test]
fn malformed_json_after_the_prefix_is_a_clear_error() {
    // A line cut short (or broken into by a kernel message) on the console.
    let cut = format!(r#"{PREFIX}{{"type":"done","ok":tr"#);
    let err = parse_line(&cut).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("malformed lab result line ("), "{msg}");
    assert!(msg.contains("line 1 column"), "{msg}");
    assert!(msg.ends_with(r#"{"type":"done","ok":tr"#), "{msg}");
    assert_eq!(err.json(), r#"{"type":"done","ok":tr"#);
    assert!(std::error::Error::source(&err).is_some());

    // A known record type without a field it needs.
    let missing = format!(r#"{PREFIX}{{"type":"done","failed":[]}}"#);
    let msg = parse_line(&missing).unwrap_err().to_string();
    assert!(msg.contains("missing field `ok`"), "{msg}");

    // Long lines are shortened in the message but kept whole in the error.
    let long = format!(
        "{PREFIX}{{\"type\":\"event\",\"text\":\"{}",
        "é".repeat(500)
    );
    let err = parse_line(&long).unwrap_err();
    assert!(err.to_string().ends_with("..."));
    assert!(err.to_string().chars().count() < 300);
    assert_eq!(err.json(), &long[PREFIX.len()..]);
}

#[test]
fn lines_without_the_prefix_are_not_results() {
    for line in [
        "[    0.000000] Linux version 6.1.0 (gcc 12.2.0)",
        "[    1.234567] NUMA: Node 0 [mem 0x00000000-0x3fffffff]",
        "@@VMBLAB-INIT@@ init reached",
        "",
        r#"{"type":"done","ok":true,"failed":[]}"#,
    ] {
        assert!(parse_line(line).unwrap().is_none(), "{line}");
    }
}

#[test]
fn unknown_fields_and_record_types_are_tolerated() {
    // A newer harness adds a field to a record the host knows...
    let extra = format!(
        r#"{PREFIX}{{"type":"done","ok":false,"failed":["x"],"retries":3,"why":{{"a":[1]}}}}"#
    );
    assert_eq!(
        parse_line(&extra).unwrap(),
        Some(Record::Done {
            ok: false,
            failed: vec!["x".into()],
        })
    );
    // ...or inside a nested struct...
    let mut line = Record::Sample(sample()).line();
    line = line.replacen(r#""pid":412"#, r#""pid":412,"numa_hit":9"#, 1);
    assert!(line.contains("numa_hit"));
    assert_eq!(parse_line(&line).unwrap(), Some(Record::Sample(sample())));
    // ...or a record type of its own.
    let future = format!(r#"{PREFIX}{{"type":"future_kind","x":1}}"#);
    assert_eq!(parse_line(&future).unwrap(), Some(Record::Other));
}

#[test]
fn per_page_truth_is_optional_on_the_wire() {
    let line = Record::Sample(sample()).line();
    // vm0 has no per-page truth: its fields are left out, not written as null.
    let vm0 = line.split(r#""name":"vm1""#).next().unwrap();
    assert!(!vm0.contains("hot_locality") && !vm0.contains("pages_moved"));
    assert_eq!(line.matches(r#""hot_locality""#).count(), 1);
    assert_eq!(parse_line(&line).unwrap(), Some(Record::Sample(sample())));
}

#[test]
fn access_weighted_fields_travel_and_are_optional() {
    // With the fields: written under their names and read back.
    let line = Record::Summary(Box::new(summary())).line();
    for key in [
        r#""access_locality":[[0.0,0.25],[5.0,0.859375]]"#,
        r#""hot_time_to_095_s":10.0"#,
        r#""first_cpu_move_affinity_s":1.25"#,
    ] {
        assert!(line.contains(key), "{key} in {line}");
    }
    assert!(!line.contains("first_cpu_move_status_s"), "{line}");
    assert_eq!(
        parse_line(&line).unwrap(),
        Some(Record::Summary(Box::new(summary())))
    );
    let line = Record::Sample(sample()).line();
    assert!(
        line.contains(r#""access_locality_mean":0.859375"#),
        "{line}"
    );
    assert_eq!(parse_line(&line).unwrap(), Some(Record::Sample(sample())));
    // An older guest's summary line, without them, reads as empty.
    let old = format!(
        "{PREFIX}{}",
        concat!(
            r#"{"type":"summary","balancer":"none","kernel":"6.1","vms":1,"#,
            r#""locality":[],"time_to_090_s":null,"time_to_095_s":null,"#,
            r#""numa_pages_migrated":0,"pgmigrate_success":0,"cpu_balance":1.0,"#,
            r#""work_touches":0,"touches_per_vcpu_s":0.0,"run_s":1.0}"#
        )
    );
    match parse_line(&old).unwrap() {
        Some(Record::Summary(s)) => {
            assert!(s.access_locality.is_empty() && s.hot_locality.is_empty());
            assert_eq!(s.first_cpu_move_status_s, None);
        }
        other => panic!("{other:?}"),
    }
}
