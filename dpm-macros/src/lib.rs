//! dpm-macros
