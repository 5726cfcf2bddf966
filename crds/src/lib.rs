//! Kubernetes API types of Portico's custom resources (group `portico.io`).
