"""Guest image recipe, libvirt domain definitions and the VM harness used by the demo and tests."""
