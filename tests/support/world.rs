//! The usual end-to-end setting: the OpenCTI double (stream and GraphQL on one address),
//! the real Threat Bus, and the data directory of a bridge that ran before (a stored
//! position at a seed event, so a start is not a first start with its replay).

use std::path::PathBuf;

use super::bridge::{store_position, BridgeEnv, TOKEN};
use super::opencti::OpenCti;
use super::opencti_graphql::GraphqlDouble;
use super::threatbus::ThreatBus;

pub struct World {
    pub opencti: OpenCti,
    /// The GraphQL side of `opencti` (a handle on the same double).
    pub graphql: GraphqlDouble,
    pub bus: ThreatBus,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn ran_before() -> World {
        let graphql = GraphqlDouble::new(TOKEN);
        let opencti = OpenCti::start_with_graphql(graphql.clone());
        let bus = ThreatBus::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = opencti.append_marking();
        store_position(&dir.path().join("data"), &seed);
        World {
            opencti,
            graphql,
            bus,
            dir,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A bridge between the two, on this data directory.
    pub fn env(&self) -> BridgeEnv {
        BridgeEnv::new(
            &self.opencti.base_url(),
            self.bus.manage_port,
            &self.data_dir(),
        )
    }
}
