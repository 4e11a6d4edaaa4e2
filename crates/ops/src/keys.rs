//! `pipeline-board keys ...`: the Redis key names, for scripts. A script that needs a key asks
//! here instead of spelling `<prefix>:{<org>}:...` itself, so the key model (board-model's
//! `keys.rs`) stays the one place names are built. A `*` as the org gives a SCAN pattern.
use board_model::keys::{Generation, KeySpace};
use board_model::model::CardKind;
use clap::{Args, Subcommand, ValueEnum};

#[derive(Args)]
pub struct KeysArgs {
    /// Prefix of every projection key (as the projector and the API take it).
    #[arg(long, env = "REDIS_PREFIX", default_value = "pb")]
    pub redis_prefix: String,
    #[command(subcommand)]
    pub key: KeyName,
}

#[derive(Subcommand, Debug, PartialEq)]
pub enum KeyName {
    /// Whether the projection is whole (hash: status, instance, since, wholeAt).
    State,
    /// Which read model built the projection.
    Model,
    /// Where read model 2 kept its marker before it moved into `{meta}` (read only).
    LegacyModel,
    /// A consumer group's progress (next offset per topic/partition).
    Progress { group: String },
    /// What the running or last rebuild was doing (hash).
    RebuildState,
    /// Which generation holds the org now (a string; absent: the base one).
    Generation { org: String },
    /// The org's card records of one kind (hash: card id -> record).
    Cards {
        org: String,
        #[arg(value_enum)]
        kind: Kind,
        #[arg(long, default_value = "")]
        generation: String,
    },
    /// The org's users (hash: user id -> team ids).
    Users {
        org: String,
        #[arg(long, default_value = "")]
        generation: String,
    },
    /// The org's pipelines (hash: pipeline id -> pipeline).
    Pipelines {
        org: String,
        #[arg(long, default_value = "")]
        generation: String,
    },
    /// A SCAN pattern of every key under the prefix.
    Pattern,
    /// A SCAN pattern of every key of the org in one generation.
    OrgPattern {
        org: String,
        #[arg(long, default_value = "")]
        generation: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Contact,
    Application,
}

/// The key `args` names.
pub fn name(args: &KeysArgs) -> anyhow::Result<String> {
    let ks = KeySpace::new(&args.redis_prefix);
    let org = |org: &str, generation: &str| {
        let g = Generation::parse(generation)
            .ok_or_else(|| anyhow::anyhow!("{generation:?} is not a generation (g<number>, or empty for the base)"))?;
        anyhow::Ok(ks.org_in(&g, org))
    };
    Ok(match &args.key {
        KeyName::State => ks.state(),
        KeyName::Model => ks.model(),
        KeyName::LegacyModel => ks.legacy_model(),
        KeyName::Progress { group } => ks.progress(group),
        KeyName::RebuildState => ks.rebuild_state(),
        KeyName::Generation { org } => ks.generation_pointer(org),
        KeyName::Cards { org: o, kind, generation } => org(o, generation)?.cards(match kind {
            Kind::Contact => CardKind::Contact,
            Kind::Application => CardKind::Application,
        }),
        KeyName::Users { org: o, generation } => org(o, generation)?.users(),
        KeyName::Pipelines { org: o, generation } => org(o, generation)?.pipelines(),
        KeyName::Pattern => ks.pattern(),
        KeyName::OrgPattern { org: o, generation } => org(o, generation)?.pattern(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        keys: KeysArgs,
    }

    fn key(args: &[&str]) -> anyhow::Result<String> {
        name(&Cli::try_parse_from(std::iter::once("keys").chain(args.iter().copied()))?.keys)
    }

    #[test]
    fn scripts_get_the_key_models_names() {
        let ks = KeySpace::new("run7");
        let org = "64f0a1b2c3d4e5f6a7b8c9d1";
        assert_eq!(key(&["--redis-prefix", "run7", "users", org]).unwrap(), ks.org(org).users());
        assert_eq!(key(&["--redis-prefix", "run7", "cards", org, "application"]).unwrap(), ks.org(org).cards(CardKind::Application));
        let g3 = Generation::numbered(3);
        assert_eq!(
            key(&["--redis-prefix", "run7", "cards", org, "contact", "--generation", "g3"]).unwrap(),
            ks.org_in(&g3, org).cards(CardKind::Contact)
        );
        assert_eq!(key(&["--redis-prefix", "run7", "progress", "run7"]).unwrap(), ks.progress("run7"));
        assert_eq!(key(&["--redis-prefix", "run7", "model"]).unwrap(), ks.model());
        assert_eq!(key(&["--redis-prefix", "run7", "generation", org]).unwrap(), ks.generation_pointer(org));
        assert_eq!(key(&["--redis-prefix", "run7", "org-pattern", "*"]).unwrap(), "run7:{*}:*");
        assert_eq!(key(&["--redis-prefix", "run7", "pattern"]).unwrap(), "run7:*");
        assert!(key(&["users", org, "--generation", "x"]).is_err(), "not a generation");
    }
}
