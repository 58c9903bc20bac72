//! Report renderer tests (written next).
