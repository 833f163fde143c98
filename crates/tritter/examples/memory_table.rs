//! Prints the memory estimate of presets at a context length (the table the CLI shows).
//!
//! `cargo run -p tritter --example memory_table -- 3b 7b 131072`

use tritter::{MemoryEstimate, TritterConfig};

fn main() -> Result<(), tritter::TritterError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let context = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(131_072);
    let mut presets: Vec<&str> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .map(String::as_str)
        .collect();
    if presets.is_empty() {
        presets = vec!["3b", "7b"];
    }
    for name in presets {
        let cfg = TritterConfig::preset(name)?;
        println!("== {name} ==\n{}", MemoryEstimate::new(&cfg, context, 1)?);
    }
    Ok(())
}
