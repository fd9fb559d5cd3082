//! Shell completions and man pages, generated from the clap definitions so they never
//! drift from the real options (`twinsan completions SHELL`, `twinsan man`). The Debian
//! package runs both at build time.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    let mut cmd = crate::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "twinsan", &mut out);
    std::io::stdout().lock().write_all(&out)
}

/// The man page twinsan(1) to stdout, or with `out_dir` twinsan.1 and one
/// twinsan-SUBCOMMAND.1 per subcommand into that directory.
pub fn man(out_dir: Option<&Path>) -> std::io::Result<()> {
    let cmd = crate::Cli::command();
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::io::stdout().lock().write_all(&out)
        }
    }
}
