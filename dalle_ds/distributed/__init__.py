"""Distributed training: process groups and collectives, the DeepSpeed adapter (the one module that
touches DeepSpeed's internals), the PowerSGD communication hook and hostfile checks."""
