//! The vibebox command line: runs the platform (vibebox up) and drives it.
