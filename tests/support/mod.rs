pub mod opencti;
pub mod opencti_graphql;
