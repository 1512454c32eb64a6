//! Which proto fields weir implements.
//!
//! Every configuration, static or (later) from xDS, is walked against this
//! table before translation. A set field that is not listed for its message
//! is an error naming the field: weir never silently ignores configuration
//! it does not implement. Fields marked `~` are accepted but only tune
//! behaviour weir does not have (hot restart, stats flushing, ...); they are
//! listed in ARCHITECTURE.md. A message marked `**` is accepted whole.
//! Value-dependent limits (an enum value weir lacks, say) are checked by the
//! translator, which names the field too.
use std::collections::HashMap;
use std::sync::OnceLock;

use prost_reflect::{DynamicMessage, ReflectMessage, Value};

use crate::descriptors::{decode_any, UDPA_TYPED_STRUCT, XDS_TYPED_STRUCT};
use crate::error::{join, ConfigErrors};

/// (message full name, fields). `~name`: accepted without effect. `**` as the
/// only entry: the whole subtree is accepted.
pub static SUPPORTED: &[(&str, &[&str])] = &[
    // --- bootstrap
    ("envoy.config.bootstrap.v3.Bootstrap", &[
        "node", "static_resources", "admin", "layered_runtime", "stats_config",
        "overload_manager", "bootstrap_extensions", "dynamic_resources", "cluster_manager",
        "application_log_config", "tracing", "~deferred_stat_options",
        "~stats_flush_interval", "~stats_flush_on_admin", "~enable_dispatcher_stats",
        "~stats_server_version_override", "~watchdog", "~watchdogs", "~use_tcp_for_dns_lookups",
        "~fatal_actions", "~inline_headers", "~perf_tracing_file_path",
        "~default_regex_engine", "~memory_allocator_manager",
    ]),
    // Istio's bootstrap sends an empty `outlier_detection`; the ejection
    // event log (`event_log_path`, `event_service`) is not implemented.
    ("envoy.config.bootstrap.v3.ClusterManager", &["outlier_detection", "local_cluster_name", "~enable_deferred_cluster_creation"]),
    ("envoy.config.bootstrap.v3.ClusterManager.OutlierDetection", &[]),
    ("envoy.config.bootstrap.v3.Bootstrap.ApplicationLogConfig", &["log_format"]),
    ("envoy.config.bootstrap.v3.Bootstrap.ApplicationLogConfig.LogFormat", &["text_format"]),
    ("envoy.config.bootstrap.v3.Bootstrap.StaticResources", &["listeners", "clusters", "secrets"]),
    ("envoy.config.bootstrap.v3.Bootstrap.DynamicResources", &[
        "lds_config", "cds_config", "ads_config", "lds_resources_locator", "cds_resources_locator",
    ]),
    ("envoy.config.core.v3.ApiConfigSource", &[
        "api_type", "grpc_services", "set_node_on_first_message_only", "cluster_names",
        "config_validators", "~transport_api_version", "~refresh_delay", "~request_timeout",
        "~rate_limit_settings",
    ]),
    ("envoy.config.core.v3.GrpcService", &["envoy_grpc", "google_grpc", "initial_metadata", "~timeout", "~retry_policy"]),
    ("envoy.config.core.v3.GrpcService.EnvoyGrpc", &["cluster_name", "authority", "~retry_policy", "~max_receive_message_length", "~skip_envoy_headers"]),
    ("envoy.config.core.v3.GrpcService.GoogleGrpc", &["target_uri", "~stat_prefix"]),
    ("envoy.config.core.v3.AggregatedConfigSource", &[]),
    ("envoy.config.core.v3.SelfConfigSource", &["~transport_api_version"]),
    ("envoy.config.core.v3.PathConfigSource", &["path", "watched_directory"]),
    ("envoy.config.core.v3.WatchedDirectory", &["path"]),
    ("envoy.config.bootstrap.v3.Admin", &[
        "address", "access_log", "~access_log_path", "~profile_path",
        "~ignore_global_conn_limit",
    ]),
    ("envoy.config.bootstrap.v3.LayeredRuntime", &["**"]),
    ("envoy.config.bootstrap.v3.Watchdog", &["**"]),
    ("envoy.config.bootstrap.v3.Watchdogs", &["**"]),
    ("envoy.config.core.v3.Node", &[
        "id", "cluster", "metadata", "locality", "~user_agent_name", "~user_agent_version",
        "~user_agent_build_version", "~extensions", "~client_features", "~dynamic_parameters",
        "~listening_addresses",
    ]),
    ("envoy.config.core.v3.Locality", &["region", "zone", "sub_zone"]),
    ("envoy.config.metrics.v3.StatsConfig", &[
        "stats_matcher", "~stats_tags", "~use_all_default_tags",
    ]),
    ("envoy.config.metrics.v3.StatsMatcher", &["reject_all", "inclusion_list", "exclusion_list"]),
    ("envoy.type.matcher.v3.ListStringMatcher", &["patterns"]),
    ("envoy.config.overload.v3.OverloadManager", &["resource_monitors", "~refresh_interval"]),
    ("envoy.config.overload.v3.ResourceMonitor", &["name", "typed_config"]),
    ("envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig", &[
        "max_active_downstream_connections",
    ]),
    ("envoy.config.core.v3.TypedExtensionConfig", &["name", "typed_config"]),
    ("envoy.extensions.bootstrap.internal_listener.v3.InternalListener", &["buffer_size_kb"]),
    // istio/proxy's workload discovery extension (WDS over ADS).
    ("istio.workload.BootstrapExtension", &["config_source"]),
    // --- addresses and sockets
    ("envoy.config.core.v3.Address", &["socket_address", "pipe", "envoy_internal_address"]),
    ("envoy.config.core.v3.EnvoyInternalAddress", &["server_listener_name", "endpoint_id"]),
    ("envoy.config.core.v3.SocketAddress", &["address", "port_value", "~protocol", "~ipv4_compat"]),
    ("envoy.config.core.v3.Pipe", &["path", "mode"]),
    ("envoy.config.core.v3.SocketOption", &["description", "level", "name", "int_value", "buf_value", "state"]),
    // --- listeners
    ("envoy.config.listener.v3.Listener", &[
        "name", "address", "filter_chains", "default_filter_chain", "per_connection_buffer_limit_bytes",
        "socket_options", "enable_reuse_port", "tcp_backlog_size", "freebind", "traffic_direction",
        "stat_prefix", "access_log", "bind_to_port", "~connection_balance_config",
        "listener_filters", "listener_filters_timeout", "continue_on_listener_filters_timeout", "~drain_type",
        "~metadata", "~reuse_port", "ignore_global_conn_limit", "bypass_overload_manager",
        "filter_chain_matcher", "internal_listener", "use_original_dst",
    ]),
    ("envoy.config.listener.v3.Listener.InternalListenerConfig", &[]),
    ("envoy.config.listener.v3.Listener.ConnectionBalanceConfig", &["**"]),
    ("envoy.config.listener.v3.FilterChain", &[
        "filters", "name", "filter_chain_match", "~metadata", "transport_socket",
        "transport_socket_connect_timeout",
    ]),
    ("envoy.config.listener.v3.FilterChainMatch", &[
        "destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
        "source_prefix_ranges", "source_ports", "server_names", "transport_protocol",
        "application_protocols",
    ]),
    ("envoy.config.listener.v3.ListenerFilter", &["name", "typed_config", "filter_disabled"]),
    ("envoy.config.listener.v3.ListenerFilterChainMatchPredicate", &[
        "or_match", "and_match", "not_match", "any_match", "destination_port_range",
    ]),
    ("envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet", &["rules"]),
    ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", &[
        "~enable_ja3_fingerprinting", "~enable_ja4_fingerprinting", "~initial_read_buffer_size",
    ]),
    ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", &[]),
    ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", &[]),
    ("envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol", &[
        "rules", "allow_requests_without_proxy_protocol", "stat_prefix", "pass_through_tlvs",
        "disallowed_versions",
    ]),
    ("envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol.Rule", &[
        "tlv_type", "on_tlv_present",
    ]),
    ("envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol.KeyValuePair", &[
        "metadata_namespace", "key", "value_string_encoding",
    ]),
    // --- TCP
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", &[
        "stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "downstream_idle_timeout",
        "upstream_idle_timeout", "access_log", "max_connect_attempts", "max_downstream_connection_duration",
        "hash_policy", "tunneling_config",
    ]),
    // `propagate_response_*` are value-checked: only `false` is accepted.
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TunnelingConfig", &[
        "hostname", "use_post", "post_path", "headers_to_add", "propagate_response_headers",
        "propagate_response_trailers",
    ]),
    ("envoy.type.v3.HashPolicy", &["source_ip", "filter_state"]),
    ("envoy.type.v3.HashPolicy.SourceIp", &[]),
    ("envoy.type.v3.HashPolicy.FilterState", &["key"]),
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster", &["clusters"]),
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight", &["name", "weight", "metadata_match"]),
    ("envoy.extensions.filters.network.sni_cluster.v3.SniCluster", &[]),
    ("envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit", &[
        "stat_prefix", "token_bucket", "runtime_enabled", "share_key",
    ]),
    ("envoy.type.v3.TokenBucket", &["max_tokens", "tokens_per_fill", "fill_interval"]),
    ("envoy.config.core.v3.RuntimeFeatureFlag", &["default_value", "~runtime_key"]),
    // --- TLS
    ("envoy.config.core.v3.TransportSocket", &["name", "typed_config"]),
    ("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", &[]),
    ("envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport", &[
        "passthrough_metadata", "transport_socket",
    ]),
    ("envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport.MetadataValueSource", &[
        "kind", "name",
    ]),
    // Request and route kinds are rejected by the translator, naming the field.
    ("envoy.type.metadata.v3.MetadataKind", &["host", "cluster", "request", "route"]),
    ("envoy.type.metadata.v3.MetadataKind.Host", &[]),
    ("envoy.type.metadata.v3.MetadataKind.Cluster", &[]),
    ("envoy.type.metadata.v3.MetadataKind.Request", &[]),
    ("envoy.type.metadata.v3.MetadataKind.Route", &[]),
    ("envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport", &[
        "config", "transport_socket", "~allow_unspecified_address", "~tlv_as_pool_key",
    ]),
    ("envoy.config.core.v3.ProxyProtocolConfig", &["version", "pass_through_tlvs", "added_tlvs"]),
    ("envoy.config.core.v3.ProxyProtocolPassThroughTLVs", &["**"]),
    ("envoy.config.core.v3.TlvEntry", &["type", "value"]),
    ("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", &[
        "common_tls_context", "require_client_certificate", "session_timeout",
        "disable_stateless_session_resumption", "disable_stateful_session_resumption",
        "ocsp_staple_policy", "~full_scan_certs_on_sni_mismatch", "prefer_client_ciphers",
        "~require_sni", "session_ticket_keys", "session_ticket_keys_sds_secret_config",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.TlsSessionTicketKeys", &["keys"]),
    ("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", &[
        "common_tls_context", "sni", "max_session_keys", "allow_renegotiation",
        "~enforce_rsa_key_usage", "auto_host_sni", "auto_sni_san_validation",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", &[
        "tls_params", "tls_certificates", "tls_certificate_sds_secret_configs", "alpn_protocols",
        "validation_context", "validation_context_sds_secret_config", "combined_validation_context",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext", &[
        "default_validation_context", "validation_context_sds_secret_config",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.TlsParameters", &[
        "tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites", "ecdh_curves",
        "signature_algorithms",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", &["certificate_chain", "private_key", "ocsp_staple"]),
    ("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", &["name", "sds_config"]),
    ("envoy.config.core.v3.ConfigSource", &[
        "ads", "api_config_source", "path", "path_config_source", "self", "initial_fetch_timeout",
        "authorities", "~resource_api_version",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext", &[
        "trusted_ca", "verify_certificate_spki", "verify_certificate_hash", "match_typed_subject_alt_names",
        "match_subject_alt_names", "crl", "allow_expired_certificate", "trust_chain_verification",
        "only_verify_leaf_cert_crl", "max_verify_depth",
    ]),
    ("envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher", &["san_type", "matcher"]),
    ("envoy.extensions.transport_sockets.tls.v3.Secret", &["name", "tls_certificate", "validation_context", "session_ticket_keys"]),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    // --- HTTP connection manager
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", &[
        "codec_type", "stat_prefix", "http_filters", "route_config", "rds", "common_http_protocol_options",
        "http_protocol_options", "http2_protocol_options", "server_name", "server_header_transformation",
        "max_request_headers_kb", "stream_idle_timeout", "request_timeout", "request_headers_timeout",
        "drain_timeout", "access_log", "use_remote_address", "xff_num_trusted_hops", "internal_address_config",
        "skip_xff_append", "via", "generate_request_id", "preserve_external_request_id",
        "always_set_request_id_in_response", "forward_client_cert_details", "upgrade_configs",
        "set_current_client_cert_details",
        "normalize_path", "merge_slashes", "path_with_escaped_slashes_action", "strip_matching_host_port",
        "strip_any_host_port", "append_x_forwarded_port", "add_user_agent", "proxy_100_continue",
        "request_id_extension", "tracing",
        "~delayed_close_timeout", "~stream_error_on_invalid_http_message", "~access_log_flush_interval",
    ]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension", &["typed_config"]),
    // Envoy's default request ID extension (what weir generates); both
    // fields steer the trace decision.
    ("envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", &[
        "pack_trace_reason", "use_request_id_for_trace_sampling",
    ]),
    // The trace decision, and spans through a provider (OpenTelemetry).
    // `verbose` and `spawn_upstream_span` are refused by the translator
    // when set with a provider (they only shape spans).
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing", &[
        "client_sampling", "random_sampling", "overall_sampling", "provider",
        "verbose", "max_path_tag_length", "custom_tags", "spawn_upstream_span",
    ]),
    ("envoy.config.trace.v3.Tracing", &["http"]),
    ("envoy.config.trace.v3.Tracing.Http", &["name", "typed_config"]),
    ("envoy.config.trace.v3.OpenTelemetryConfig", &["grpc_service", "service_name"]),
    // Versions other than HTTP_JSON, split spans and W3C propagation are
    // refused by the translator.
    ("envoy.config.trace.v3.ZipkinConfig", &[
        "collector_cluster", "collector_endpoint", "trace_id_128bit", "shared_span_context",
        "collector_endpoint_version", "collector_hostname", "split_spans_for_request",
        "trace_context_option",
    ]),
    // `metadata` and `value` tags: accepted without a provider (no spans),
    // refused by the translator with one.
    ("envoy.type.tracing.v3.CustomTag", &["tag", "literal", "environment", "request_header", "metadata", "value"]),
    ("envoy.type.tracing.v3.CustomTag.Metadata", &["**"]),
    ("envoy.type.tracing.v3.CustomTag.Literal", &["value"]),
    ("envoy.type.tracing.v3.CustomTag.Environment", &["name", "default_value"]),
    ("envoy.type.tracing.v3.CustomTag.Header", &["name", "default_value"]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.InternalAddressConfig", &[
        "unix_sockets", "cidr_ranges",
    ]),
    ("envoy.config.core.v3.CidrRange", &["address_prefix", "prefix_len"]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails", &[
        "subject", "cert", "chain", "dns", "uri",
    ]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig", &[
        "upgrade_type", "enabled",
    ]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter", &["name", "typed_config", "~is_optional"]),
    ("envoy.extensions.filters.http.router.v3.Router", &[
        "suppress_envoy_headers", "respect_expected_rq_timeout", "~dynamic_stats", "~start_child_span",
    ]),
    // --- HTTP filters besides the router (ARCHITECTURE.md "Pass-through
    // filters"). The fault filter is implemented (delay and abort, fixed or
    // header-controlled); its `*_runtime` keys are accepted without effect:
    // weir has no runtime layer, so Envoy's behaviour without runtime
    // overrides is weir's. `response_rate_limit` and `filter_metadata` are
    // rejected by the translator, naming the field.
    ("envoy.extensions.filters.http.fault.v3.HTTPFault", &[
        "delay", "abort", "upstream_cluster", "headers", "downstream_nodes", "max_active_faults",
        "disable_downstream_cluster_stats",
        "~delay_percent_runtime", "~abort_percent_runtime", "~delay_duration_runtime",
        "~abort_http_status_runtime", "~max_active_faults_runtime",
        "~response_rate_limit_percent_runtime", "~abort_grpc_status_runtime",
    ]),
    ("envoy.extensions.filters.common.fault.v3.FaultDelay", &["fixed_delay", "header_delay", "percentage"]),
    ("envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay", &[]),
    ("envoy.extensions.filters.http.fault.v3.FaultAbort", &[
        "http_status", "grpc_status", "header_abort", "percentage", "response_body",
    ]),
    ("envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort", &[]),
    // envoy.filters.http.local_ratelimit (ARCHITECTURE.md "HTTP local rate
    // limit"). `local_cluster_rate_limit`, the filter's own `rate_limits`,
    // `enable_retry_after_header` and descriptors' `shadow_mode` are not
    // implemented (rejected, see PENDING).
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", &[
        "stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced",
        "request_headers_to_add_when_not_enforced", "response_headers_to_add", "descriptors",
        "stage", "local_rate_limit_per_downstream_connection",
        "enable_x_ratelimit_headers", "vh_rate_limits", "always_consume_default_token_bucket",
        "rate_limited_as_resource_exhausted", "max_dynamic_descriptors",
    ]),
    ("envoy.type.v3.HttpStatus", &["code"]),
    // envoy.filters.http.ext_authz (ARCHITECTURE.md "External
    // authorization"): the rest of `ExtAuthz` is rejected.
    ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", &[
        "grpc_service", "http_service", "transport_api_version", "failure_mode_allow",
        "failure_mode_allow_header_add", "status_on_error",
        "metadata_context_namespaces", "filter_enabled", "deny_at_disable",
        "stat_prefix", "allowed_headers", "filter_enabled_metadata",
        "~charge_cluster_response_stats", "with_request_body", "include_peer_certificate",
    ]),
    // `allow_partial_message: true` is rejected by the translator.
    ("envoy.extensions.filters.http.ext_authz.v3.BufferSettings", &[
        "max_request_bytes", "allow_partial_message", "pack_as_bytes",
    ]),
    ("envoy.extensions.filters.http.ext_authz.v3.HttpService", &[
        "server_uri", "path_prefix", "authorization_request", "authorization_response",
    ]),
    ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest", &["allowed_headers", "headers_to_add"]),
    ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse", &[
        "allowed_upstream_headers", "allowed_upstream_headers_to_append", "allowed_client_headers",
        "allowed_client_headers_on_success", "dynamic_metadata_from_headers",
    ]),
    ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", &["disabled", "check_settings"]),
    ("envoy.extensions.filters.network.ext_authz.v3.ExtAuthz", &[
        "stat_prefix", "grpc_service", "failure_mode_allow", "transport_api_version",
    ]),
    // envoy.filters.http.ratelimit (ARCHITECTURE.md "Global rate limit").
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", &[
        "domain", "stage", "request_type", "timeout", "failure_mode_deny", "rate_limit_service",
        "enable_x_ratelimit_headers", "disable_x_envoy_ratelimited_header",
        "rate_limited_as_resource_exhausted", "rate_limited_status", "filter_enabled",
        "filter_enforced",
    ]),
    ("envoy.config.ratelimit.v3.RateLimitServiceConfig", &["grpc_service", "transport_api_version"]),
    // Per route: which virtual host rate limits apply, and the domain
    // (`rate_limits` and `override_option` are not implemented).
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute", &["vh_rate_limits", "domain"]),
    ("envoy.extensions.filters.http.ext_authz.v3.CheckSettings", &["context_extensions", "disable_request_body_buffering"]),
    ("envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor", &["entries", "token_bucket"]),
    ("envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry", &["key", "value"]),
    // Route and virtual host `rate_limits` (the descriptors rate limit
    // filters ask about).
    ("envoy.config.route.v3.RateLimit", &["stage", "disable_key", "actions"]),
    ("envoy.config.route.v3.RateLimit.Action", &[
        "destination_cluster", "request_headers", "query_parameters", "remote_address",
        "masked_remote_address", "generic_key", "header_value_match",
        "query_parameter_value_match",
    ]),
    ("envoy.config.route.v3.RateLimit.Action.DestinationCluster", &[]),
    ("envoy.config.route.v3.RateLimit.Action.RequestHeaders", &["header_name", "descriptor_key", "skip_if_absent"]),
    ("envoy.config.route.v3.RateLimit.Action.QueryParameters", &["query_parameter_name", "descriptor_key", "skip_if_absent"]),
    ("envoy.config.route.v3.RateLimit.Action.RemoteAddress", &[]),
    ("envoy.config.route.v3.RateLimit.Action.MaskedRemoteAddress", &["v4_prefix_mask_len", "v6_prefix_mask_len"]),
    ("envoy.config.route.v3.RateLimit.Action.GenericKey", &["descriptor_value", "descriptor_key"]),
    ("envoy.config.route.v3.RateLimit.Action.HeaderValueMatch", &["descriptor_value", "descriptor_key", "expect_match", "headers"]),
    ("envoy.config.route.v3.RateLimit.Action.QueryParameterValueMatch", &[
        "descriptor_value", "descriptor_key", "expect_match", "query_parameters",
    ]),
    // RBAC (HTTP and network): `rules` policies with the matchers weir
    // evaluates, or the matcher API (`matcher`, `shadow_matcher`: see the
    // xDS matcher below); metadata, CEL conditions and audit logging are
    // rejected (PENDING).
    ("envoy.extensions.filters.http.rbac.v3.RBAC", &[
        "rules", "rules_stat_prefix", "shadow_rules", "shadow_rules_stat_prefix",
        "matcher", "shadow_matcher",
    ]),
    ("envoy.config.rbac.v3.Action", &["name", "action"]),
    // The xDS matcher API (`translate/match_tree.rs`); each user accepts
    // its own inputs and actions, the translator rejects the others naming
    // the field.
    ("xds.type.matcher.v3.Matcher", &["matcher_list", "matcher_tree", "on_no_match"]),
    ("xds.type.matcher.v3.Matcher.OnMatch", &["matcher", "action"]),
    ("xds.type.matcher.v3.Matcher.MatcherList", &["matchers"]),
    ("xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher", &["predicate", "on_match"]),
    ("xds.type.matcher.v3.Matcher.MatcherList.Predicate", &[
        "single_predicate", "or_matcher", "and_matcher", "not_matcher",
    ]),
    ("xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate", &[
        "input", "value_match", "custom_match",
    ]),
    ("xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList", &["predicate"]),
    ("xds.type.matcher.v3.Matcher.MatcherTree", &[
        "input", "exact_match_map", "prefix_match_map", "custom_match",
    ]),
    // A listener's `filter_chain_matcher` action: the chain's name.
    ("google.protobuf.StringValue", &["value"]),
    // The IP tree (`custom_match`, Envoy's trie matcher).
    ("xds.type.matcher.v3.IPMatcher", &["range_matchers"]),
    ("xds.type.matcher.v3.IPMatcher.IPRangeMatcher", &["ranges", "on_match", "exclusive"]),
    ("xds.core.v3.CidrRange", &["address_prefix", "prefix_len"]),
    ("xds.type.matcher.v3.Matcher.MatcherTree.MatchMap", &["map"]),
    ("xds.core.v3.TypedExtensionConfig", &["name", "typed_config"]),
    ("xds.type.matcher.v3.StringMatcher", &["exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"]),
    ("xds.type.matcher.v3.RegexMatcher", &["regex", "~google_re2"]),
    ("xds.type.matcher.v3.RegexMatcher.GoogleRE2", &[]),
    ("envoy.type.matcher.v3.HttpRequestHeaderMatchInput", &["header_name"]),
    ("envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.SourceIPInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.SourcePortInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.DirectSourceIPInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.ServerNameInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.FilterStateInput", &["key"]),
    ("envoy.extensions.matching.common_inputs.network.v3.SourceTypeInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput", &[]),
    ("envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput", &[]),
    ("envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput", &[]),
    ("envoy.extensions.matching.common_inputs.ssl.v3.DnsSanInput", &[]),
    ("envoy.extensions.matching.common_inputs.ssl.v3.SubjectInput", &[]),
    // The IP matcher: `stat_prefix` names Envoy's `ip_parsing_failed`
    // counter, which weir does not emit (a value that is no IP simply
    // does not match, as in Envoy).
    ("envoy.extensions.matching.input_matchers.ip.v3.Ip", &["cidr_ranges", "~stat_prefix"]),
    ("envoy.extensions.filters.http.rbac.v3.RBACPerRoute", &["rbac"]),
    ("envoy.extensions.filters.http.buffer.v3.Buffer", &["max_request_bytes"]),
    ("envoy.extensions.filters.http.buffer.v3.BufferPerRoute", &["disabled", "buffer"]),
    ("envoy.extensions.filters.http.health_check.v3.HealthCheck", &[
        "pass_through_mode", "cache_time", "cluster_min_healthy_percentages", "headers",
    ]),
    // header_mutation: header mutations (query parameter and trailer
    // mutations are rejected).
    ("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation", &[
        "mutations", "most_specific_header_mutations_wins",
    ]),
    ("envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute", &["mutations"]),
    ("envoy.extensions.filters.http.header_mutation.v3.Mutations", &[
        "request_mutations", "response_mutations",
    ]),
    ("envoy.config.common.mutation_rules.v3.HeaderMutation", &["remove", "append", "remove_on_match"]),
    ("envoy.config.common.mutation_rules.v3.HeaderMutation.RemoveOnMatch", &["key_matcher"]),
    // set_filter_state (HTTP): string objects set at the request headers.
    ("envoy.extensions.filters.http.set_filter_state.v3.Config", &["on_request_headers"]),
    ("envoy.extensions.filters.network.set_filter_state.v3.Config", &["on_new_connection"]),
    ("envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue", &[
        "object_key", "factory_key", "format_string", "read_only", "shared_with_upstream",
        "skip_if_empty",
    ]),
    ("envoy.extensions.filters.network.rbac.v3.RBAC", &[
        "rules", "shadow_rules", "shadow_rules_stat_prefix", "stat_prefix", "enforcement_type",
        "matcher", "shadow_matcher",
    ]),
    ("envoy.config.rbac.v3.RBAC", &["action", "policies"]),
    ("envoy.config.rbac.v3.Policy", &["permissions", "principals"]),
    ("envoy.config.rbac.v3.Permission", &[
        "and_rules", "or_rules", "any", "header", "url_path", "destination_ip",
        "destination_port", "destination_port_range", "not_rule", "requested_server_name",
        "metadata",
    ]),
    ("envoy.config.rbac.v3.Permission.Set", &["rules"]),
    ("envoy.config.rbac.v3.Principal", &[
        "and_ids", "or_ids", "any", "authenticated", "source_ip", "direct_remote_ip",
        "remote_ip", "header", "url_path", "not_id", "filter_state", "metadata",
    ]),
    ("envoy.type.matcher.v3.FilterStateMatcher", &["key", "string_match"]),
    ("envoy.config.rbac.v3.Principal.Set", &["ids"]),
    ("envoy.config.rbac.v3.Principal.Authenticated", &["principal_name"]),
    ("envoy.type.matcher.v3.PathMatcher", &["path"]),
    // RBAC `metadata` matchers read the request's dynamic metadata
    // (jwt_authn's `payload_in_metadata`, Istio's `request.auth.claims`).
    ("envoy.type.matcher.v3.MetadataMatcher", &["filter", "path", "value", "invert"]),
    ("envoy.type.matcher.v3.MetadataMatcher.PathSegment", &["key"]),
    ("envoy.type.matcher.v3.ValueMatcher", &[
        "null_match", "double_match", "string_match", "bool_match", "present_match", "list_match",
        "or_match",
    ]),
    ("envoy.type.matcher.v3.ValueMatcher.NullMatch", &[]),
    ("envoy.type.matcher.v3.DoubleMatcher", &["range", "exact"]),
    ("envoy.type.v3.DoubleRange", &["start", "end"]),
    ("envoy.type.matcher.v3.ListMatcher", &["one_of"]),
    ("envoy.type.matcher.v3.OrMatcher", &["value_matchers"]),
    // envoy.filters.http.jwt_authn (ARCHITECTURE.md "JWT authentication").
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", &[
        "providers", "rules", "requirement_map", "bypass_cors_preflight", "strip_failure_response",
    ]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtProvider", &[
        "issuer", "audiences", "forward", "from_headers", "from_params", "from_cookies",
        "forward_payload_header", "pad_forward_payload_header", "payload_in_metadata",
        "header_in_metadata", "clock_skew_seconds", "claim_to_headers", "local_jwks",
        "remote_jwks",
    ]),
    ("envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks", &["http_uri", "cache_duration"]),
    ("envoy.config.core.v3.HttpUri", &["uri", "cluster", "timeout"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtHeader", &["name", "value_prefix"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader", &["header_name", "claim_name"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.RequirementRule", &["match", "requires", "requirement_name"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement", &[
        "provider_name", "provider_and_audiences", "requires_any", "requires_all",
        "allow_missing_or_failed", "allow_missing",
    ]),
    ("envoy.extensions.filters.http.jwt_authn.v3.ProviderWithAudiences", &["provider_name", "audiences"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementOrList", &["requirements"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementAndList", &["requirements"]),
    ("envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig", &["disabled", "requirement_name"]),
    ("envoy.type.v3.Int32Range", &["start", "end"]),
    // `typed_per_filter_config` values: the filter's config or this wrapper
    // (`is_optional` only matters for filters weir does not know, which are
    // rejected anyway).
    ("envoy.config.route.v3.FilterConfig", &["config", "disabled", "~is_optional"]),
    ("envoy.extensions.filters.http.cors.v3.Cors", &[]),
    // CORS policies: `typed_per_filter_config`, and the deprecated `cors` of
    // virtual hosts and route actions. `runtime_key`s of `filter_enabled` /
    // `shadow_enabled` are accepted without effect (no runtime layer).
    ("envoy.extensions.filters.http.cors.v3.CorsPolicy", &[
        "allow_origin_string_match", "allow_methods", "allow_headers", "expose_headers", "max_age",
        "allow_credentials", "filter_enabled", "shadow_enabled", "allow_private_network_access",
        "forward_not_matching_preflights",
    ]),
    ("envoy.config.route.v3.CorsPolicy", &[
        "allow_origin_string_match", "allow_methods", "allow_headers", "expose_headers", "max_age",
        "allow_credentials", "filter_enabled", "shadow_enabled", "allow_private_network_access",
        "forward_not_matching_preflights",
    ]),
    // `emit_filter_state`: the `envoy.filters.http.grpc_stats` filter state
    // object (message counts) for `%FILTER_STATE%`.
    ("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", &[
        "emit_filter_state", "individual_method_stats_allowlist", "stats_for_all_methods",
        "enable_upstream_stats", "replace_dots_in_grpc_service_name",
    ]),
    ("envoy.config.core.v3.GrpcMethodList", &["services"]),
    // The compressor filter: response compression with gzip, brotli and
    // zstd. Request compression, the newer response options and zstd
    // dictionaries are rejected by the translator, naming the field.
    // `memory_level` tunes zlib's internal state only (ARCHITECTURE.md).
    ("envoy.extensions.filters.http.compressor.v3.Compressor", &[
        "compressor_library", "response_direction_config", "request_direction_config",
        "choose_first", "content_length", "content_type", "disable_on_etag_header",
        "remove_accept_encoding_header", "runtime_enabled",
    ]),
    ("envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig", &[
        "common_config", "disable_on_etag_header", "remove_accept_encoding_header",
        "weaken_etag_on_compress", "uncompressible_response_codes", "status_header_enabled",
    ]),
    ("envoy.extensions.filters.http.compressor.v3.Compressor.RequestDirectionConfig", &["common_config"]),
    ("envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig", &[
        "enabled", "min_content_length", "content_type", "content_type_matcher",
    ]),
    ("envoy.extensions.filters.http.compressor.v3.CompressorPerRoute", &["disabled", "overrides"]),
    ("envoy.extensions.filters.http.compressor.v3.CompressorOverrides", &[
        "response_direction_config", "compressor_library",
    ]),
    ("envoy.extensions.filters.http.compressor.v3.ResponseDirectionOverrides", &["remove_accept_encoding_header"]),
    // No runtime layer: the default value decides (as the fault filter's keys).
    ("envoy.config.core.v3.RuntimeFeatureFlag", &["default_value", "~runtime_key"]),
    ("envoy.extensions.compression.gzip.compressor.v3.Gzip", &[
        "compression_level", "compression_strategy", "window_bits", "chunk_size", "~memory_level",
    ]),
    ("envoy.extensions.compression.brotli.compressor.v3.Brotli", &[
        "quality", "encoder_mode", "window_bits", "input_block_bits", "chunk_size",
        "disable_literal_context_modeling",
    ]),
    ("envoy.extensions.compression.zstd.compressor.v3.Zstd", &[
        "compression_level", "enable_checksum", "strategy", "chunk_size", "dictionary",
    ]),
    ("envoy.config.core.v3.GrpcMethodList.Service", &["name", "method_names"]),
    // Istio's filters (descriptors hand-built in descriptors.rs). The HTTP
    // `istio.stats` and peer metadata filters run (ARCHITECTURE.md "Istio
    // telemetry"); the network `istio.stats` is pass-through. Metric scope
    // rotation only bounds memory (weir's label cache is bounded); TCP
    // connections are reported at close (totals as Istio's periodic
    // reports; ARCHITECTURE.md "Istio ALPN and the TCP metadata exchange").
    ("stats.PluginConfig", &[
        "disable_host_header_fallback", "~tcp_reporting_duration", "metrics", "definitions",
        "reporter", "~rotation_interval", "~graceful_deletion_interval",
    ]),
    ("stats.MetricConfig", &["dimensions", "name", "tags_to_remove", "match", "drop"]),
    ("io.istio.http.peer_metadata.Config", &[
        "downstream_discovery", "upstream_discovery", "downstream_propagation",
        "upstream_propagation", "shared_with_upstream", "additional_labels",
    ]),
    ("io.istio.http.peer_metadata.Config.DiscoveryMethod", &[
        "baggage", "workload_discovery", "istio_headers", "upstream_filter_state",
    ]),
    ("io.istio.http.peer_metadata.Config.PropagationMethod", &["istio_headers", "baggage"]),
    ("io.istio.http.peer_metadata.Config.IstioHeaders", &["skip_external_clusters"]),
    ("io.istio.http.peer_metadata.Config.Baggage", &[]),
    ("io.istio.http.peer_metadata.Config.WorkloadDiscovery", &[]),
    ("io.istio.http.peer_metadata.Config.UpstreamFilterState", &["peer_metadata_key"]),
    ("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", &["alpn_override"]),
    ("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride", &[
        "upstream_protocol", "alpn_override",
    ]),
    // `enable_discovery`: the WDS fallback when no header came (without the
    // bootstrap extension it finds nothing, as Istio without a provider).
    ("envoy.tcp.metadataexchange.config.MetadataExchange", &[
        "protocol", "enable_discovery", "additional_labels",
    ]),
    ("envoy.config.core.v3.HttpProtocolOptions", &[
        "idle_timeout", "max_connection_duration", "max_headers_count", "max_stream_duration",
        "headers_with_underscores_action", "max_requests_per_connection",
    ]),
    ("envoy.config.core.v3.Http1ProtocolOptions", &["accept_http_10", "default_host_for_http_10"]),
    ("envoy.config.core.v3.Http2ProtocolOptions", &[
        "max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size",
        "allow_connect", "connection_keepalive", "~hpack_table_size", "~max_outbound_frames",
        "~max_outbound_control_frames", "~max_consecutive_inbound_frames_with_empty_payload",
        "~max_inbound_priority_frames_per_stream", "~max_inbound_window_update_frames_per_data_frame_sent",
        "~stream_error_on_invalid_http_messaging", "~override_stream_error_on_invalid_http_message",
    ]),
    ("envoy.config.core.v3.KeepaliveSettings", &["interval", "timeout", "~interval_jitter", "~connection_idle_interval"]),
    // --- routes
    ("envoy.config.route.v3.RouteConfiguration", &[
        "name", "virtual_hosts", "internal_only_headers", "response_headers_to_add",
        "response_headers_to_remove", "request_headers_to_add", "request_headers_to_remove",
        "most_specific_header_mutations_wins", "ignore_port_in_host_matching", "~validate_clusters",
        "typed_per_filter_config",
        "~max_direct_response_body_size_bytes",
    ]),
    ("envoy.config.route.v3.VirtualHost", &[
        "name", "domains", "routes", "require_tls", "request_headers_to_add", "request_headers_to_remove",
        "response_headers_to_add", "response_headers_to_remove", "include_request_attempt_count",
        "include_attempt_count_in_response", "retry_policy", "typed_per_filter_config",
        // Deprecated, still honoured by Envoy 1.40's CORS filter.
        "cors",
        "rate_limits", "hedge_policy",
    ]),
    ("envoy.config.route.v3.Route", &[
        "name", "match", "route", "redirect", "direct_response", "request_headers_to_add",
        "request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove",
        "~metadata", "decorator", "typed_per_filter_config", "tracing",
    ]),
    ("envoy.config.route.v3.Decorator", &["operation", "propagate"]),
    ("envoy.config.route.v3.Tracing", &["client_sampling", "random_sampling", "overall_sampling", "custom_tags"]),
    ("envoy.config.route.v3.RouteMatch", &[
        "prefix", "path", "safe_regex", "path_separated_prefix", "connect_matcher", "case_sensitive",
        "headers", "query_parameters", "runtime_fraction", "grpc", "tls_context",
    ]),
    ("envoy.config.route.v3.RouteMatch.TlsContextMatchOptions", &["presented", "validated"]),
    ("envoy.config.route.v3.RouteMatch.ConnectMatcher", &[]),
    ("envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions", &[]),
    ("envoy.config.core.v3.RuntimeFractionalPercent", &["default_value", "~runtime_key"]),
    ("envoy.type.v3.FractionalPercent", &["numerator", "denominator"]),
    ("envoy.config.route.v3.HeaderMatcher", &[
        "name", "exact_match", "safe_regex_match", "range_match", "present_match", "prefix_match",
        "suffix_match", "contains_match", "string_match", "invert_match", "treat_missing_header_as_empty",
    ]),
    ("envoy.config.route.v3.QueryParameterMatcher", &["name", "string_match", "present_match"]),
    ("envoy.type.matcher.v3.StringMatcher", &["exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"]),
    ("envoy.type.matcher.v3.RegexMatcher", &["regex", "~google_re2"]),
    ("envoy.type.matcher.v3.RegexMatcher.GoogleRE2", &["**"]),
    ("envoy.type.matcher.v3.RegexMatchAndSubstitute", &["pattern", "substitution"]),
    ("envoy.type.v3.Int64Range", &["start", "end"]),
    ("envoy.config.route.v3.RouteAction", &[
        "cluster", "cluster_header", "weighted_clusters", "cluster_not_found_response_code",
        "prefix_rewrite", "regex_rewrite", "host_rewrite_literal", "auto_host_rewrite",
        "host_rewrite_header", "host_rewrite_path_regex", "append_x_forwarded_host", "timeout",
        "idle_timeout", "retry_policy", "max_stream_duration", "upgrade_configs", "max_grpc_timeout",
        // Deprecated, still honoured by Envoy 1.40's CORS filter.
        "cors",
        "rate_limits", "include_vh_rate_limits", "request_mirror_policies", "hash_policy",
        "hedge_policy", "internal_redirect_policy",
        // Deprecated (Envoy 1.40 still turns them into an internal redirect policy).
        "internal_redirect_action", "max_internal_redirects",
        // The cluster's HIGH circuit-breaker thresholds and connection pools.
        "priority",
    ]),
    // Router extras (ARCHITECTURE.md "Hedging and internal redirects"):
    // `initial_requests` / `additional_request_chance` are not implemented
    // by Envoy's router either (rejected, see PENDING).
    ("envoy.config.route.v3.HedgePolicy", &["hedge_on_per_try_timeout"]),
    ("envoy.config.route.v3.InternalRedirectPolicy", &[
        "max_internal_redirects", "redirect_response_codes", "predicates",
        "allow_cross_scheme_redirect", "response_headers_to_copy",
    ]),
    ("envoy.extensions.internal_redirect.previous_routes.v3.PreviousRoutesConfig", &[]),
    ("envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig", &["allowed_route_names"]),
    ("envoy.extensions.internal_redirect.safe_cross_scheme.v3.SafeCrossSchemeConfig", &[]),
    // Shadowing: `trace_sampled` only steers the shadow's own span (weir
    // makes no span for a shadow request).
    ("envoy.config.route.v3.RouteAction.RequestMirrorPolicy", &[
        "cluster", "cluster_header", "runtime_fraction", "~trace_sampled",
        "disable_shadow_host_suffix_append", "request_headers_mutations", "host_rewrite_literal",
    ]),
    ("envoy.config.route.v3.RouteAction.HashPolicy", &[
        "header", "cookie", "connection_properties", "query_parameter", "filter_state", "terminal",
    ]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.FilterState", &["key"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Header", &["header_name", "regex_rewrite"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Cookie", &["name", "ttl", "path", "attributes"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.CookieAttribute", &["name", "value"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties", &["source_ip"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter", &["name"]),
    ("envoy.config.route.v3.RouteAction.UpgradeConfig", &["upgrade_type", "enabled", "connect_config"]),
    // CONNECT termination (ARCHITECTURE.md "CONNECT termination"); its two
    // fields are rejected (PENDING).
    ("envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig", &[]),
    ("envoy.config.route.v3.RouteAction.MaxStreamDuration", &["max_stream_duration", "grpc_timeout_header_max"]),
    ("envoy.config.route.v3.WeightedCluster", &["clusters", "total_weight", "~runtime_key_prefix"]),
    ("envoy.config.route.v3.WeightedCluster.ClusterWeight", &[
        "name", "weight", "request_headers_to_add", "request_headers_to_remove",
        "response_headers_to_add", "response_headers_to_remove", "host_rewrite_literal",
    ]),
    ("envoy.config.route.v3.RetryPolicy", &[
        "retry_on", "num_retries", "per_try_timeout", "retry_host_predicate",
        "host_selection_retry_max_attempts", "retriable_status_codes", "retry_back_off",
        "retriable_headers", "retriable_request_headers", "rate_limited_retry_back_off",
    ]),
    ("envoy.config.route.v3.RetryPolicy.RateLimitedRetryBackOff", &["reset_headers", "max_interval"]),
    ("envoy.config.route.v3.RetryPolicy.ResetHeader", &["name", "format"]),
    ("envoy.config.route.v3.RetryPolicy.RetryBackOff", &["base_interval", "max_interval"]),
    ("envoy.config.route.v3.RetryPolicy.RetryHostPredicate", &["name", "typed_config"]),
    ("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate", &[]),
    ("envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate", &[]),
    ("envoy.extensions.retry.host.omit_host_metadata.v3.OmitHostMetadataConfig", &["metadata_match"]),
    ("envoy.config.route.v3.RedirectAction", &[
        "https_redirect", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
        "prefix_rewrite", "regex_rewrite", "response_code", "strip_query",
    ]),
    ("envoy.config.route.v3.DirectResponseAction", &["status", "body"]),
    ("envoy.config.core.v3.DataSource", &["filename", "inline_bytes", "inline_string", "environment_variable"]),
    ("envoy.config.core.v3.HeaderValueOption", &["header", "append", "append_action", "keep_empty_value"]),
    ("envoy.config.core.v3.HeaderValue", &["key", "value", "raw_value"]),
    // --- access logs
    ("envoy.config.accesslog.v3.AccessLog", &["name", "typed_config", "filter"]),
    ("envoy.config.accesslog.v3.AccessLogFilter", &[
        "status_code_filter", "duration_filter", "not_health_check_filter", "and_filter", "or_filter",
        "response_flag_filter", "header_filter",
    ]),
    ("envoy.config.accesslog.v3.StatusCodeFilter", &["comparison"]),
    ("envoy.config.accesslog.v3.DurationFilter", &["comparison"]),
    ("envoy.config.accesslog.v3.ComparisonFilter", &["op", "value"]),
    ("envoy.config.core.v3.RuntimeUInt32", &["default_value", "~runtime_key"]),
    ("envoy.config.accesslog.v3.NotHealthCheckFilter", &[]),
    ("envoy.config.accesslog.v3.AndFilter", &["filters"]),
    ("envoy.config.accesslog.v3.OrFilter", &["filters"]),
    ("envoy.config.accesslog.v3.ResponseFlagFilter", &["flags"]),
    ("envoy.config.accesslog.v3.HeaderFilter", &["header"]),
    ("envoy.extensions.access_loggers.file.v3.FileAccessLog", &["path", "format", "json_format", "log_format"]),
    ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", &["log_format"]),
    ("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", &["log_format"]),
    ("envoy.config.core.v3.SubstitutionFormatString", &["text_format", "text_format_source", "json_format", "~content_type"]),
    // --- clusters
    ("envoy.config.cluster.v3.Cluster", &[
        "name", "alt_stat_name", "type", "connect_timeout", "lb_policy", "load_assignment", "eds_cluster_config",
        "dns_refresh_rate", "respect_dns_ttl", "dns_lookup_family", "typed_extension_protocol_options",
        "http2_protocol_options", "http_protocol_options", "common_http_protocol_options",
        "least_request_lb_config", "~per_connection_buffer_limit_bytes", "common_lb_config",
        "round_robin_lb_config",
        "transport_socket", "transport_socket_matches", "max_requests_per_connection", "filters",
        "circuit_breakers", "upstream_connection_options", "outlier_detection",
        "ring_hash_lb_config", "maglev_lb_config", "load_balancing_policy", "health_checks",
        "cleanup_interval", "original_dst_lb_config", "metadata", "~use_tcp_for_dns_lookups",
    ]),
    // Active health checking (`upstream/health_check.rs`): HTTP/1.1 and
    // HTTP/2 GET, gRPC and TCP checks; no event logs, TLS options or alt_port.
    ("envoy.config.core.v3.HealthCheck", &[
        "timeout", "interval", "initial_jitter", "interval_jitter", "interval_jitter_percent",
        "unhealthy_threshold", "healthy_threshold", "reuse_connection", "no_traffic_interval",
        "no_traffic_healthy_interval", "unhealthy_interval", "unhealthy_edge_interval",
        "healthy_edge_interval", "http_health_check", "tcp_health_check", "grpc_health_check",
        "tls_options", "transport_socket_match_criteria",
    ]),
    ("envoy.config.core.v3.HealthCheck.TlsOptions", &["alpn_protocols"]),
    ("envoy.config.core.v3.HealthCheck.GrpcHealthCheck", &["service_name", "authority", "initial_metadata"]),
    ("envoy.config.core.v3.HealthCheck.HttpHealthCheck", &[
        "host", "path", "expected_statuses", "codec_client_type", "request_headers_to_add",
        "request_headers_to_remove",
    ]),
    ("envoy.config.core.v3.HealthCheck.TcpHealthCheck", &["send", "receive"]),
    ("envoy.config.core.v3.HealthCheck.Payload", &["text", "binary"]),
    ("envoy.config.cluster.v3.UpstreamConnectionOptions", &["tcp_keepalive"]),
    ("envoy.config.cluster.v3.Filter", &["name", "typed_config"]),
    ("envoy.config.core.v3.TcpKeepalive", &["keepalive_probes", "keepalive_time", "keepalive_interval"]),
    ("envoy.config.cluster.v3.CircuitBreakers", &["thresholds"]),
    ("envoy.config.cluster.v3.CircuitBreakers.Thresholds", &[
        "priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
        "track_remaining", "retry_budget",
    ]),
    ("envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget", &["budget_percent", "min_retry_concurrency"]),
    // `successful_active_health_check_uneject_host`: a passing active check does not un-eject (yet).
    ("envoy.config.cluster.v3.OutlierDetection", &[
        "consecutive_5xx", "interval", "base_ejection_time", "max_ejection_percent",
        "enforcing_consecutive_5xx", "enforcing_success_rate", "success_rate_minimum_hosts",
        "success_rate_request_volume", "success_rate_stdev_factor", "consecutive_gateway_failure",
        "enforcing_consecutive_gateway_failure", "split_external_local_origin_errors",
        "consecutive_local_origin_failure", "enforcing_consecutive_local_origin_failure",
        "enforcing_local_origin_success_rate", "failure_percentage_threshold",
        "enforcing_failure_percentage", "enforcing_failure_percentage_local_origin",
        "failure_percentage_minimum_hosts", "failure_percentage_request_volume",
        "max_ejection_time", "max_ejection_time_jitter", "always_eject_one_host",
        "~successful_active_health_check_uneject_host",
    ]),
    ("envoy.config.cluster.v3.Cluster.EdsClusterConfig", &["eds_config", "service_name"]),
    ("envoy.extensions.filters.network.http_connection_manager.v3.Rds", &["config_source", "route_config_name"]),
    ("envoy.config.cluster.v3.Cluster.TransportSocketMatch", &["name", "match", "transport_socket"]),
    ("envoy.config.cluster.v3.Cluster.LeastRequestLbConfig", &["choice_count", "slow_start_config"]),
    ("envoy.config.cluster.v3.Cluster.RoundRobinLbConfig", &["slow_start_config"]),
    ("envoy.config.cluster.v3.Cluster.SlowStartConfig", &["slow_start_window", "aggression", "min_weight_percent"]),
    ("envoy.extensions.load_balancing_policies.common.v3.SlowStartConfig", &["slow_start_window", "aggression", "min_weight_percent"]),
    // `aggression`: the default value (no runtime layer).
    ("envoy.config.core.v3.RuntimeDouble", &["default_value", "~runtime_key"]),
    ("envoy.config.cluster.v3.Cluster.CommonLbConfig", &[
        "healthy_panic_threshold", "consistent_hashing_lb_config", "locality_weighted_lb_config",
        "zone_aware_lb_config",
    ]),
    // Zone-aware routing takes effect with `cluster_manager.local_cluster_name`.
    ("envoy.config.cluster.v3.Cluster.CommonLbConfig.ZoneAwareLbConfig", &[
        "routing_enabled", "min_cluster_size", "fail_traffic_on_panic",
    ]),
    ("envoy.config.cluster.v3.Cluster.CommonLbConfig.LocalityWeightedLbConfig", &[]),
    ("envoy.config.cluster.v3.Cluster.CommonLbConfig.ConsistentHashingLbConfig", &["use_hostname_for_hashing", "hash_balance_factor"]),
    ("envoy.config.cluster.v3.Cluster.RingHashLbConfig", &["minimum_ring_size", "maximum_ring_size", "hash_function"]),
    ("envoy.config.cluster.v3.Cluster.MaglevLbConfig", &["table_size"]),
    // ORIGINAL_DST clusters (`upstream/original_dst.rs`); ignored by other types, as Envoy.
    ("envoy.config.cluster.v3.Cluster.OriginalDstLbConfig", &[
        "use_http_header", "http_header_name", "upstream_port_override", "metadata_key",
    ]),
    // `load_balancing_policy`: the first policy is used (Envoy uses the first
    // it knows; an extension weir lacks anywhere in the list is rejected).
    ("envoy.config.cluster.v3.LoadBalancingPolicy", &["policies"]),
    ("envoy.config.cluster.v3.LoadBalancingPolicy.Policy", &["typed_extension_config"]),
    ("envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin", &["locality_lb_config", "slow_start_config"]),
    ("envoy.extensions.load_balancing_policies.random.v3.Random", &["locality_lb_config"]),
    ("envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest", &["choice_count", "locality_lb_config", "slow_start_config"]),
    ("envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig", &[
        "locality_weighted_lb_config", "zone_aware_lb_config",
    ]),
    // As the legacy ZoneAwareLbConfig; `force_local_zone`, `locality_basis`
    // and the deprecated `force_locality_direct_routing` are rejected.
    ("envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig.ZoneAwareLbConfig", &[
        "routing_enabled", "min_cluster_size", "fail_traffic_on_panic",
    ]),
    ("envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash", &[
        "hash_function", "minimum_ring_size", "maximum_ring_size", "consistent_hashing_lb_config",
        "locality_weighted_lb_config",
    ]),
    ("envoy.extensions.load_balancing_policies.maglev.v3.Maglev", &[
        "table_size", "consistent_hashing_lb_config", "locality_weighted_lb_config",
    ]),
    ("envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost", &[
        "override_host_sources", "fallback_policy", "selected_host_key",
    ]),
    ("envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost.OverrideHostSource", &["header", "metadata"]),
    ("envoy.type.metadata.v3.MetadataKey", &["key", "path"]),
    ("envoy.type.metadata.v3.MetadataKey.PathSegment", &["key"]),
    ("envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig.LocalityWeightedLbConfig", &[]),
    ("envoy.extensions.load_balancing_policies.common.v3.ConsistentHashingLbConfig", &["use_hostname_for_hashing", "hash_policy", "hash_balance_factor"]),
    ("envoy.type.v3.Percent", &["value"]),
    ("envoy.config.endpoint.v3.ClusterLoadAssignment", &["cluster_name", "endpoints", "policy"]),
    ("envoy.config.endpoint.v3.ClusterLoadAssignment.Policy", &["overprovisioning_factor", "weighted_priority_health"]),
    ("envoy.config.endpoint.v3.LocalityLbEndpoints", &["locality", "lb_endpoints", "load_balancing_weight", "priority"]),
    ("envoy.config.endpoint.v3.LbEndpoint", &["endpoint", "health_status", "load_balancing_weight", "metadata"]),
    ("envoy.config.endpoint.v3.Endpoint", &["address", "hostname"]),
    ("envoy.config.core.v3.Metadata", &["filter_metadata", "~typed_filter_metadata"]),
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", &[
        "common_http_protocol_options", "explicit_http_config", "use_downstream_protocol_config", "auto_config",
        "upstream_http_protocol_options",
    ]),
    ("envoy.config.core.v3.UpstreamHttpProtocolOptions", &["auto_sni", "auto_san_validation", "override_auto_sni_header"]),
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig", &["http_protocol_options", "http2_protocol_options"]),
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig", &["http_protocol_options", "http2_protocol_options"]),
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig", &["http_protocol_options", "http2_protocol_options"]),
];

/// Fields rejected with a reason because the traffic-policy work will
/// implement them: (message, field, reason).
pub static PENDING: &[(&str, &str, &str)] = &[
    (
        "envoy.config.route.v3.RetryPolicy",
        "retry_priority",
        "retry priority plugins (envoy.retry_priorities.previous_priorities) are not implemented",
    ),
    (
        "envoy.config.route.v3.RetryPolicy",
        "retry_options_predicates",
        "retry options predicates (upstream socket options per retry) are not implemented",
    ),
    (
        "envoy.config.route.v3.HedgePolicy",
        "initial_requests",
        "not implemented (Envoy 1.40's router ignores it too)",
    ),
    (
        "envoy.config.route.v3.HedgePolicy",
        "additional_request_chance",
        "not implemented (Envoy 1.40's router ignores it too)",
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig",
        "proxy_protocol_config",
        "a PROXY protocol header on terminated CONNECT tunnels is not implemented",
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig",
        "allow_post",
        "POST tunnels (allow_post) are not implemented",
    ),
    (
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        "response_rate_limit",
        "response_rate_limit (response body throttling) is not implemented",
    ),
    (
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        "filter_metadata",
        "filter_metadata (dynamic metadata on injected faults) is not implemented",
    ),
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "local_cluster_rate_limit",
        "local_cluster_rate_limit (tokens shared across the local cluster) is not implemented",
    ),
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "rate_limits",
        "the filter's own rate_limits are not implemented (route and virtual host rate_limits are)",
    ),
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "enable_retry_after_header",
        "enable_retry_after_header is not implemented",
    ),
    (
        "envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor",
        "shadow_mode",
        "descriptor shadow_mode is not implemented",
    ),
    (
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        "track_per_rule_stats",
        "per-policy RBAC stats are not implemented",
    ),
    (
        "envoy.extensions.filters.network.rbac.v3.RBAC",
        "delay_deny",
        "delay_deny is not implemented",
    ),
    (
        "envoy.config.rbac.v3.RBAC",
        "audit_logging_options",
        "RBAC audit logging is not implemented",
    ),
    (
        "envoy.config.rbac.v3.Policy",
        "condition",
        "CEL conditions are not implemented",
    ),
    (
        "envoy.config.rbac.v3.Policy",
        "checked_condition",
        "CEL conditions are not implemented",
    ),
    (
        "envoy.config.rbac.v3.Policy",
        "cel_config",
        "CEL conditions are not implemented",
    ),
    (
        "envoy.config.rbac.v3.Permission",
        "sourced_metadata",
        "sourced_metadata matching is not implemented",
    ),
    (
        "envoy.config.rbac.v3.Permission",
        "matcher",
        "RBAC matcher extensions are not implemented",
    ),
    (
        "envoy.config.rbac.v3.Permission",
        "uri_template",
        "uri_template is not implemented",
    ),
    (
        "envoy.config.rbac.v3.Principal",
        "sourced_metadata",
        "sourced_metadata matching is not implemented",
    ),
    (
        "envoy.config.rbac.v3.Principal",
        "custom",
        "custom principal extensions are not implemented",
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks",
        "async_fetch",
        "async_fetch (fetching at start) is not implemented: JWKS are fetched on first use",
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks",
        "retry_policy",
        "JWKS fetch retries are not implemented",
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider",
        "failed_status_in_metadata",
        "failed_status_in_metadata is not implemented",
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "filter_state_rules",
        "filter_state_rules (requirements chosen by filter state) are not implemented",
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement",
        "extract_only_without_validation",
        "extract_only_without_validation is not implemented",
    ),
    (
        "envoy.config.cluster.v3.Cluster",
        "lb_subset_config",
        "subset load balancing (lb_subset_config) is not implemented; Istio sends DestinationRule subsets as separate clusters",
    ),
    (
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig",
        "active_request_bias",
        "active_request_bias is not implemented (weighted least request uses Envoy's default bias 1.0)",
    ),
    (
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
        "active_request_bias",
        "active_request_bias is not implemented (weighted least request uses Envoy's default bias 1.0)",
    ),
    (
        "envoy.config.core.v3.TlvEntry",
        "format_string",
        "upstream PROXY protocol TLVs from a format string are not implemented (static values are)",
    ),
    (
        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
        "tlv_location",
        "TLVs in filter state (FILTER_STATE) are not implemented; rules write dynamic metadata only",
    ),
];

/// The rejection message for a [`PENDING`] field.
pub fn pending_reason(message: &str, field: &str) -> Option<String> {
    PENDING
        .iter()
        .find(|(m, f, _)| *m == message && *f == field)
        .map(|(_, _, why)| format!("{why} (field {field:?} of {message})"))
}

/// Message names that may appear inside `Any` (`typed_config` etc.).
fn table() -> &'static HashMap<&'static str, &'static [&'static str]> {
    static T: OnceLock<HashMap<&'static str, &'static [&'static str]>> = OnceLock::new();
    T.get_or_init(|| SUPPORTED.iter().copied().collect())
}

/// Walks `msg` and reports every set field weir does not implement.
pub fn check(msg: &DynamicMessage, path: &str, errs: &mut ConfigErrors) {
    let desc = msg.descriptor();
    let full = desc.full_name();
    if full.starts_with("google.protobuf.") {
        if full == "google.protobuf.Any" {
            check_any(msg, path, errs);
        }
        return;
    }
    let Some(fields) = table().get(full) else {
        errs.push(path.to_owned(), format!("weir does not implement {full}"));
        return;
    };
    if fields.first() == Some(&"**") {
        return;
    }
    for (field, value) in msg.fields() {
        let name = field.name();
        let known = fields
            .iter()
            .any(|f| *f == name || f.strip_prefix('~') == Some(name));
        let fpath = join(path, name);
        if !known {
            let reason = pending_reason(full, name)
                .unwrap_or_else(|| format!("weir does not implement field {name:?} of {full}"));
            errs.push(fpath, reason);
            continue;
        }
        if fields.iter().any(|f| f.strip_prefix('~') == Some(name)) {
            continue; // accepted without effect: do not descend.
        }
        check_value(value, &fpath, errs);
    }
}

fn check_value(value: &Value, path: &str, errs: &mut ConfigErrors) {
    match value {
        Value::Message(m) => check(m, path, errs),
        Value::List(items) => {
            for (i, v) in items.iter().enumerate() {
                check_value(v, &format!("{path}[{i}]"), errs);
            }
        }
        Value::Map(map) => {
            for (k, v) in map {
                check_value(v, &format!("{path}[{k:?}]"), errs);
            }
        }
        _ => {}
    }
}

fn check_any(msg: &DynamicMessage, path: &str, errs: &mut ConfigErrors) {
    let type_url = msg
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = msg
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let inner = match decode_any(&type_url, &bytes) {
        Ok(m) => m,
        Err(e) => return errs.push(path.to_owned(), e),
    };
    // A TypedStruct stands for its inner message (as in Envoy and on the
    // YAML path): check that one, the keys of its `value` included.
    let inner = if is_typed_struct(inner.descriptor().full_name()) {
        match typed_struct_inner(&inner, path) {
            Ok(m) => m,
            Err(e) => return errs.extend(e),
        }
    } else {
        inner
    };
    let desc = inner.descriptor();
    let name = desc.full_name();
    if !table().contains_key(name) {
        errs.push(
            path.to_owned(),
            format!("weir does not implement extension {name}"),
        );
        return;
    }
    check(&inner, path, errs);
}

fn is_typed_struct(full_name: &str) -> bool {
    full_name == UDPA_TYPED_STRUCT || full_name == XDS_TYPED_STRUCT
}

/// The message a `TypedStruct` stands for: its `value` Struct read through
/// the proto-JSON mapping as the message its `type_url` names. Unknown keys
/// and bad values are errors under `path` (the Any's), as on the YAML path.
fn typed_struct_inner(ts: &DynamicMessage, path: &str) -> Result<DynamicMessage, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let url = ts
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let name = url.rsplit('/').next().unwrap_or(&url);
    let Some(desc) = crate::descriptors::message(name) else {
        errs.push(
            join(path, "type_url"),
            format!("unknown type URL {url:?}: weir has no such extension"),
        );
        return Err(errs);
    };
    let value = match ts
        .get_field_by_name("value")
        .as_deref()
        .map(Value::as_message)
    {
        Some(Some(m)) => match serde_json::to_value(m) {
            Ok(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            Ok(v) => v,
            Err(e) => {
                // A Struct number that JSON cannot hold (NaN, infinity).
                errs.push(
                    join(path, "value"),
                    format!("not representable as JSON: {e}"),
                );
                return Err(errs);
            }
        },
        _ => serde_json::Value::Object(Default::default()),
    };
    crate::bootstrap::json_to_message(value, &desc, Default::default()).map_err(|mut e| {
        for err in &mut e.0 {
            err.path = if err.path.is_empty() {
                path.to_owned()
            } else {
                join(path, &err.path)
            };
        }
        e
    })
}

/// For translators: a `TypedStruct` `Any` (either spelling) as the `Any` of
/// the message it stands for; any other `Any` as it is.
pub fn unwrap_typed_struct<'a>(
    any: &'a crate::api::google::protobuf::Any,
    path: &str,
) -> Result<std::borrow::Cow<'a, crate::api::google::protobuf::Any>, ConfigErrors> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if !is_typed_struct(name) {
        return Ok(std::borrow::Cow::Borrowed(any));
    }
    let ts = decode_any(&any.type_url, &any.value).map_err(|e| {
        let mut errs = ConfigErrors::default();
        errs.push(path.to_owned(), e);
        errs
    })?;
    let inner = typed_struct_inner(&ts, path)?;
    Ok(std::borrow::Cow::Owned(crate::api::google::protobuf::Any {
        type_url: format!("type.googleapis.com/{}", inner.descriptor().full_name()),
        value: prost::Message::encode_to_vec(&inner),
    }))
}

/// Checks a prost message by transcoding it to a dynamic one.
pub fn check_proto<M: prost::Message + prost::Name>(m: &M, path: &str) -> ConfigErrors {
    let mut errs = ConfigErrors::default();
    let name = M::full_name();
    let Some(desc) = crate::descriptors::message(&name) else {
        errs.push(path.to_owned(), format!("no descriptor for {name}"));
        return errs;
    };
    match DynamicMessage::decode(desc, m.encode_to_vec().as_slice()) {
        Ok(d) => check(&d, path, &mut errs),
        Err(e) => errs.push(path.to_owned(), e.to_string()),
    }
    errs
}

/// Rows for the documentation table: (message, field) accepted without effect.
pub fn accepted_without_effect() -> impl Iterator<Item = (&'static str, &'static str)> {
    SUPPORTED.iter().flat_map(|(m, fs)| {
        fs.iter()
            .filter_map(move |f| f.strip_prefix('~').map(|f| (*m, f)))
    })
}

/// Renders `docs/config-support.md` from the table.
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# Configuration weir implements\n\n\
         Generated from `xds-client/src/support.rs` (`UPDATE_DOCS=1 cargo test -p xds-client support` \
         rewrites it). A field set in a configuration that is not listed for its message is \
         rejected at startup (or NACKed) with its field path. Fields in the *accepted without \
         effect* column only tune machinery weir does not have; they are accepted and ignored. \
         Messages marked *whole* are accepted entirely. Value limits (an LB policy or cluster type \
         not built yet) are checked by the translator and also rejected with the field path.\n\n\
         | message | implemented fields | accepted without effect |\n|---|---|---|\n",
    );
    for (m, fields) in SUPPORTED {
        let (imp, acc): (Vec<&str>, Vec<&str>) = if fields.first() == Some(&"**") {
            (vec!["*whole message*"], vec![])
        } else {
            (
                fields
                    .iter()
                    .filter(|f| !f.starts_with('~'))
                    .copied()
                    .collect(),
                fields.iter().filter_map(|f| f.strip_prefix('~')).collect(),
            )
        };
        let fmt = |v: Vec<&str>| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.iter()
                    .map(|f| {
                        if f.starts_with('*') {
                            f.to_string()
                        } else {
                            format!("`{f}`")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out.push_str(&format!("| `{m}` | {} | {} |\n", fmt(imp), fmt(acc)));
    }
    out.push_str(
        "\n## Rejected with a reason\n\n\
         These fields are rejected with the reason below. Filters that are accepted but not run \
         yet (their fields are *accepted without effect* above) are listed in ARCHITECTURE.md, \
         \"Pass-through filters\", and counted in the `weir.pass_through_filter.*` gauges.\n\n\
         | message | field | reason |\n|---|---|---|\n",
    );
    for (m, f, why) in PENDING {
        out.push_str(&format!("| `{m}` | `{f}` | {why} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_doc_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config-support.md");
        let want = render_markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &want).expect("write docs");
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config-support.md is stale: run UPDATE_DOCS=1 cargo test -p xds-client support"
        );
    }

    /// A TypedStruct whose Struct holds a number JSON cannot (NaN) is an
    /// error, not an empty configuration.
    #[test]
    fn typed_struct_value_json_cannot_hold_is_rejected() {
        use crate::api::google::protobuf::{value::Kind, Any, Struct, Value as PbValue};
        let value = Struct {
            fields: [(
                "disable_host_header_fallback".to_owned(),
                PbValue {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        let mut bytes = Vec::new();
        prost::encoding::string::encode(
            1,
            &"type.googleapis.com/stats.PluginConfig".to_owned(),
            &mut bytes,
        );
        prost::encoding::message::encode(2, &value, &mut bytes);
        let any = Any {
            type_url: format!("type.googleapis.com/{UDPA_TYPED_STRUCT}"),
            value: bytes,
        };
        let e = unwrap_typed_struct(&any, "f.typed_config").expect_err("NaN");
        assert_eq!(e.0[0].path, "f.typed_config.value", "{e}");
    }

    #[test]
    fn every_table_entry_names_a_real_message_and_field() {
        for (m, fields) in SUPPORTED {
            let desc =
                crate::descriptors::message(m).unwrap_or_else(|| panic!("unknown message {m}"));
            for f in fields.iter() {
                if *f == "**" {
                    continue;
                }
                let f = f.trim_start_matches('~');
                assert!(desc.get_field_by_name(f).is_some(), "{m} has no field {f}");
            }
        }
    }
}
