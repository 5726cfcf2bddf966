//! Library target so that `portico-xdp` can name this crate as a build dependency (cargo then
//! rebuilds the loader when the program's sources change). The program itself is `main.rs`.
#![no_std]
