//! Turns a flattened image tree into a bootable ext4 root filesystem.
