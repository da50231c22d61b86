"""Shared by every test package: this directory is on sys.path, so test modules
import the common helpers in ``busybox_tree`` directly."""
