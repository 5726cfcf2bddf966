//! Measures how long an Established session takes to encode its full table.
//! `cargo run --release -p portico-announcer --example encode_speed -- 100000`

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ipnet::IpNet;
use portico_announcer::testing::{established_session, established_session_with};
use portico_announcer::{Command, RouteAttrs};

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let attrs = RouteAttrs {
        communities: vec![0xfde8_0001],
        large_communities: vec![],
        ..Default::default()
    };
    for family in ["ipv4", "ipv6"] {
        let prefixes: Vec<IpNet> = (0..n)
            .map(|i| match family {
                "ipv4" => IpNet::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 32).unwrap(),
                _ => IpNet::new(
                    Ipv6Addr::from(0xfd00u128 << 112 | u128::from(i)).into(),
                    128,
                )
                .unwrap(),
            })
            .collect();
        // Full-table path: the table is held before the session comes up; the time
        // covers the OPEN/KEEPALIVE exchange plus encoding every UPDATE.
        let now = Instant::now();
        let t0 = Instant::now();
        let mut s = established_session_with(now, false, prefixes.clone(), attrs.clone());
        let full = t0.elapsed();
        drop(s.poll_transmit());
        // Incremental path: announced while Established.
        let mut s2 = established_session(now, false);
        let t0 = Instant::now();
        s2.handle_command(
            now,
            Command::Announce {
                prefixes,
                attrs: attrs.clone(),
            },
        );
        let t1 = Instant::now();
        let mut bytes = 0;
        let mut chunks = 0;
        while let Some(b) = s2.poll_transmit() {
            bytes += b.len();
            chunks += 1;
        }
        let t2 = Instant::now();
        println!(
            "{{\"family\":\"{family}\",\"prefixes\":{n},\"full_table_establish_s\":{:.4}}}",
            full.as_secs_f64()
        );
        println!(
            "{{\"family\":\"{family}\",\"prefixes\":{n},\"rib_insert_s\":{:.4},\"encode_s\":{:.4},\"bytes\":{bytes},\"chunks\":{chunks}}}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
}
