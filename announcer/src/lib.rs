//! Portico's BGP announcer.
