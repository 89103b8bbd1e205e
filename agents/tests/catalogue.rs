//! The pool catalogue: the default pool, and every kind of invalid catalogue.

use troupe_agents::{Catalogue, CatalogueError};

#[test]
fn the_default_catalogue_is_928_agents_in_six_tiers() {
    let c = Catalogue::default_pool().unwrap();
    let tiers: Vec<(&str, usize)> = c
        .tiers
        .iter()
        .map(|t| (t.name.as_str(), t.agents.iter().map(|a| a.count).sum()))
        .collect();
    assert_eq!(
        tiers,
        [
            ("cecca", 3),
            ("board", 15),
            ("executive", 25),
            ("stack_chief", 50),
            ("specialist", 200),
            ("micro", 635)
        ]
    );
    assert_eq!(c.total_agents(), 928);
    assert_eq!(c.max_agents, 928);
    // Every tier maps to kinds and capabilities.
    assert!(
        c.tiers
            .iter()
            .all(|t| t.agents.iter().all(|a| !a.capabilities.is_empty()))
    );
}

fn err(text: &str) -> String {
    Catalogue::from_toml_str(text).unwrap_err().to_string()
}

#[test]
fn invalid_catalogues_are_refused_naming_the_field() {
    assert_eq!(
        err("[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"wizard\"\ncount = 1"),
        "invalid catalogue field `tiers[0].agents[0].kind`: unknown agent kind `wizard` \
         (built-in kinds: echo, compute, io, router, aggregator, faulty)"
    );
    assert_eq!(
        err("[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 0"),
        "invalid catalogue field `tiers[0].agents[0].count`: must be at least 1 (got 0)"
    );
    assert_eq!(
        err(
            "[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 1\n[[tiers.agents]]\nkind = \"io\"\ncount = -3"
        ),
        "invalid catalogue field `tiers[0].agents[1].count`: must be at least 1 (got -3)"
    );
    assert_eq!(
        err(
            "max_agents = 10\n[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 6\n\
             [[tiers]]\nname = \"b\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 5"
        ),
        "the tiers ask for 11 agents but `max_agents` is 10"
    );
    assert_eq!(
        err(
            "[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 1\n\
             [[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 1"
        ),
        "invalid catalogue field `tiers[1].name`: duplicate tier name `a`"
    );
    assert_eq!(
        err(
            "[[tiers]]\nname = \"a\"\nintensity = { max_restarts = 1, period = \"0s\" }\n[[tiers.agents]]\nkind = \"echo\"\ncount = 1"
        ),
        "invalid catalogue field `tiers[0].intensity.period`: must be above zero"
    );
    // Unknown fields and wrong types name their path too.
    assert!(matches!(
        Catalogue::from_toml_str("[[tiers]]\nname = \"a\"\ncolour = \"red\""),
        Err(CatalogueError::Invalid { field, .. }) if field == "tiers[0].colour"
    ));
    assert!(matches!(
        Catalogue::from_toml_str("[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = \"two\""),
        Err(CatalogueError::Invalid { field, .. }) if field == "tiers[0].agents[0].count"
    ));
    assert!(matches!(
        Catalogue::from_toml_str("[[tiers]"),
        Err(CatalogueError::Parse(_))
    ));
    assert!(matches!(
        Catalogue::from_file("/no/such/pool.toml"),
        Err(CatalogueError::Io { .. })
    ));
}
