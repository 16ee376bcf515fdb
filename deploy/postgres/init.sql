-- One database per VibeBox service (each runs its own migrations).
CREATE DATABASE vibebox_identity OWNER vibebox;
CREATE DATABASE vibebox_policy OWNER vibebox;
CREATE DATABASE vibebox_orchestrator OWNER vibebox;
CREATE DATABASE vibebox_audit OWNER vibebox;
