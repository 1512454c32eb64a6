#!/usr/bin/env python3
"""Inserts the HTTP filters istiod always installs before every router of a
peers.sh-shaped Envoy bootstrap (or its template).

usage: istio_filters.py IN OUT [upstream|istio|all]
  upstream  grpc_stats (emit_filter_state), fault, cors (all empty): the
            filters upstream Envoy has too
  istio     Istio's peer metadata (istio_headers) and istio.stats
            (SERVER_GATEWAY), which upstream Envoy does not have
  all       both (default)
"""
import sys

ROUTER = "          - name: envoy.filters.http.router\n"
TS = "type.googleapis.com/udpa.type.v1.TypedStruct"
UPSTREAM = """          - name: envoy.filters.http.grpc_stats
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              emit_filter_state: true
              stats_for_all_methods: false
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
"""
ISTIO = f"""          - name: istio.metadata_exchange
            typed_config:
              "@type": {TS}
              type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
              value: {{upstream_discovery: [{{istio_headers: {{}}}}], upstream_propagation: [{{istio_headers: {{}}}}]}}
          - name: istio.stats
            typed_config:
              "@type": {TS}
              type_url: type.googleapis.com/stats.PluginConfig
              value: {{disable_host_header_fallback: true, reporter: SERVER_GATEWAY}}
"""

src, dst = sys.argv[1], sys.argv[2]
which = sys.argv[3] if len(sys.argv) > 3 else "all"
extra = {"upstream": UPSTREAM, "istio": ISTIO, "all": UPSTREAM + ISTIO}[which]
s = open(src).read()
assert ROUTER in s, f"{src}: no router filter at the expected indentation"
open(dst, "w").write(s.replace(ROUTER, extra + ROUTER))
