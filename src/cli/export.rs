//! `anyproxy export FORMAT --config FILE [--user NAME]`: one user's client profile (see
//! `anyproxy::config::profile`), the same text the admin listener serves at
//! `/profiles/FORMAT`.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::builder::{PossibleValuesParser, TypedValueParser};

use anyproxy::config::profile::{Bypass, Format, ProfileRequest, ProfileSource};
use anyproxy::config::Config;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  anyproxy export pac --config gateway.yaml --user alice --host proxy.example.com > alice.pac
  anyproxy export env --config gateway.yaml --user alice > alice.env && . ./alice.env
  anyproxy export proxychains --config gateway.yaml --user alice --host 203.0.113.7 > alice.conf")]
pub struct ExportArgs {
    /// The client: a PAC file, a Clash / Mihomo configuration, a proxychains4
    /// configuration, shell `export` lines, or curl commands.
    #[arg(value_parser = format_parser())]
    pub format: Format,
    /// The gateway's configuration file (its `proxy:` and `gateway.groups` sections).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The user whose profile it is; needed when several accounts exist.
    #[arg(long)]
    pub user: Option<String>,
    /// The name or address clients reach the gateway at; by default the listener's
    /// address (needed when it listens on every interface).
    #[arg(long)]
    pub host: Option<String>,
    /// More destinations that go direct, comma-separated: networks (192.168.0.0/16) or
    /// domains (corp.example). Loopback, link-local, localhost and .local always do.
    #[arg(long, value_delimiter = ',')]
    pub bypass: Vec<Bypass>,
    /// What the curl lines fetch.
    #[arg(long)]
    pub url: Option<String>,
}

/// The format names as clap's possible values, so that `--help` and the shell
/// completions list them.
fn format_parser() -> impl TypedValueParser<Value = Format> {
    PossibleValuesParser::new(Format::ALL.map(Format::name)).try_map(|s| s.parse::<Format>())
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let gateway = config.gateway.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no `gateway:` section: profiles describe a gateway's proxies",
            args.config.display()
        )
    })?;
    let profile = ProfileSource::new(gateway, config.proxy.as_ref())
        .profile(&ProfileRequest {
            user: args.user,
            host: args.host,
            bypass: args.bypass,
            url: args.url,
        })
        .with_context(|| format!("{}", args.config.display()))?;
    print!("{}", profile.render(args.format)?);
    Ok(())
}
