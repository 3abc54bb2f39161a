//! Rules of a gateway that more than one part of the operator follows, each in one place and
//! free of I/O: [`refs`], the Secrets a gateway references.

pub mod refs;
