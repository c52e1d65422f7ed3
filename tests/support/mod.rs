pub mod opencti;
