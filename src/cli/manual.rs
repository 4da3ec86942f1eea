//! `anyproxy completions SHELL` and `anyproxy man`: shell completions and man pages
//! generated from the same clap definitions as the parser, so they cannot drift.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  anyproxy completions bash > /etc/bash_completion.d/anyproxy
  anyproxy completions zsh > \"${fpath[1]}/_anyproxy\"
  anyproxy completions fish > ~/.config/fish/completions/anyproxy.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: Shell,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  anyproxy man | man -l -
  anyproxy man --dir /usr/local/share/man/man1")]
pub struct ManArgs {
    /// Write anyproxy.1 and a page per subcommand (anyproxy-gateway.1, ...) into this
    /// directory instead of printing anyproxy.1.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "anyproxy", &mut std::io::stdout());
    Ok(())
}

pub fn man(args: ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&out)
                .context("writing the man page")
        }
    }
}
