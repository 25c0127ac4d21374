"""The host side of aerate: the aerated daemon and the aeratectl operator CLI."""
