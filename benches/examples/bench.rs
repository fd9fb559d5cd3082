//! `twinsan bench` as a standalone binary (the same code the `twinsan` CLI runs):
//! `cargo run --release -p twinsan-benches --example bench -- URL [options]`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "twinsan-bench", about = "iSCSI load generator and verifier")]
struct Cli {
    #[command(flatten)]
    args: benches::BenchArgs,
}

fn main() -> ExitCode {
    match benches::run_cli(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinsan bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
