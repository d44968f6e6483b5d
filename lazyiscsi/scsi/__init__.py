"""The SCSI layer: CDB decoding and SBC/SPC emulation over a block backend, shared by both
frontends. It knows nothing of iSCSI or TCMU; ``dispatch.execute`` is its one entry point."""
