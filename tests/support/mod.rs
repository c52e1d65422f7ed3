pub mod opencti_graphql;
