//! Portico's address allocator (LB-IPAM). Pure: plain data in, decisions out.
