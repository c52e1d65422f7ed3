//! Test doubles and harnesses shared by the integration tests. Each test binary uses only
//! part of them, so unused items are expected here.
#![allow(dead_code)]

pub mod bridge;
pub mod fakebus;
pub mod opencti;
pub mod opencti_graphql;
pub mod proxy;
pub mod reader;
pub mod threatbus;
pub mod world;
