//! DAI tests live in tests/.
