//! The memory report: bytes per token per layer and totals, checked against DESIGN.md's
//! worked example (7B, 8 KV heads of D = 128, 131072 tokens: 5.4 GB in INT4).

use kv_int4::{bytes_per_token_per_layer, memory_report, KvFormat, KvShape};

/// INT4 is 0.625 bytes per value and f16 2; the 7B preset at 128K context is 5.37 GB
/// (DESIGN.md: 5.4 GB) against 17.2 GB in f16; prints the README table.
#[test]
fn seven_b_at_128k_is_5_4_gb() {
    assert_eq!(bytes_per_token_per_layer(KvFormat::Int4, 8, 128), 1280);
    assert_eq!(bytes_per_token_per_layer(KvFormat::F16, 8, 128), 4096);
    let context = 131_072;
    let row = memory_report(KvShape::TRITTER_7B, context);
    assert_eq!(row.int4_total, 32 * 1280 * context as u64);
    assert!((row.int4_total as f64 / 1e9 - 5.37).abs() < 0.01, "{row}");
    let sixteen = KvShape {
        heads_kv: 16,
        ..KvShape::TRITTER_7B
    };
    assert!((memory_report(sixteen, context).int4_total as f64 / 1e9 - 10.74).abs() < 0.01);
    println!("| model | context | INT4 B/token/layer | f16 B/token/layer | INT4 GB | f16 GB |");
    for shape in [KvShape::TRITTER_3B, KvShape::TRITTER_7B, sixteen] {
        for ctx in [4096, 32_768, context] {
            println!("{}", memory_report(shape, ctx));
        }
    }
}
