//! The runtime's experiment knobs read from the environment when the configuration leaves them unset:
//! `LORA_GRID_CAP` (a positive block count), `LORA_BRANCH_ORDER` (parsed by `BranchOrder::parse`),
//! `LORA_PROJECTION_GROUPS` (parsed in `projection`), and `LORA_PDL` (`1`/`0`: launch each decode group's
//! expand as a programmatic dependent launch of its shrink, `Geometry::with_programmatic`).

use crate::GraphError;

/// `set` if given, else the environment variable `name` through `parse` (unset or empty: `None`): how the
/// runtime's experiment knobs ([`super::RuntimeConfig::lora_grid_cap`], [`super::RuntimeConfig::lora_branch_order`]) take
/// their environment defaults.
pub(super) fn config_or_env<T>(
    set: Option<T>,
    name: &str,
    parse: impl Fn(&str) -> Result<T, GraphError>,
) -> Result<Option<T>, GraphError> {
    match (set, std::env::var(name)) {
        (Some(v), _) => Ok(Some(v)),
        (None, Ok(v)) if !v.trim().is_empty() => parse(v.trim()).map(Some),
        (None, _) => Ok(None),
    }
}

/// A positive block count (`LORA_GRID_CAP`).
pub(super) fn parse_grid_cap(v: &str) -> Result<u32, GraphError> {
    match v.parse::<u32>() {
        Ok(c) if c > 0 => Ok(c),
        _ => Err(GraphError::Config(format!("LORA_GRID_CAP={v:?}: give a positive number of blocks"))),
    }
}

/// An on/off switch (`LORA_PDL`): `1`, `on`, `true` or `0`, `off`, `false`.
pub(super) fn parse_switch(v: &str) -> Result<bool, GraphError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" => Ok(true),
        "0" | "off" | "false" => Ok(false),
        _ => Err(GraphError::Config(format!("switch {v:?}: give 1 or 0 (on / off)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knob_values_parse_or_give_typed_errors() {
        assert_eq!(parse_grid_cap("132").unwrap(), 132);
        for bad in ["0", "-3", "many", ""] {
            assert!(matches!(parse_grid_cap(bad), Err(GraphError::Config(_))), "{bad:?} accepted as a grid cap");
        }
        assert_eq!(super::super::BranchOrder::parse("base-first").unwrap(), super::super::BranchOrder::BaseFirst);
        assert_eq!(super::super::BranchOrder::parse(" lora-first ").unwrap(), super::super::BranchOrder::LoraFirst);
        assert!(matches!(super::super::BranchOrder::parse("gemm-first"), Err(GraphError::Config(_))));
        // A value given in the configuration wins without reading the environment.
        assert_eq!(config_or_env(Some(7), "LORA_TEST_UNSET_KNOB", parse_grid_cap).unwrap(), Some(7));
        assert_eq!(config_or_env(None, "LORA_TEST_UNSET_KNOB", parse_grid_cap).unwrap(), None);
        assert!(parse_switch("1").unwrap() && parse_switch("On").unwrap());
        assert!(!parse_switch("0").unwrap() && !parse_switch("false").unwrap());
        assert!(matches!(parse_switch("yes please"), Err(GraphError::Config(_))));
    }
}
