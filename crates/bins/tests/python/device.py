#!/usr/bin/env python3
"""A directcall device in Python (paho-mqtt 2.x), written from docs/PROTOCOL.md
alone: the test of the wire contract in another language
(crates/bins/tests/it/python_device.rs runs it against the real gateway on
MQTT 3.1.1 and 5).

Methods:
  echo        answers its request
  add         {"a": x, "b": y} -> x + y; anything else -> 400 with a JSON body
  slow        waits `request` milliseconds, then answers "done"
  bad_status  answers with the string "201" as its status (a broken device)
Any other method: 404, at once.

It keeps a presence record with a last will, drops redelivered ids and
requests past their deadline, sends a delivery receipt when asked (at once:
the simplest correct device), answers MQTT 5 requests on their Response Topic
with their Correlation Data, and answers plain MQTT 5 requests
(`{target}/{method}`).

Prints "ready" once subscribed and online.
"""

import argparse
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SKEW_MS = 1000
SEEN_MAX = 10000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--presence-root", default="directcall/presence")
    args = p.parse_args()
    Device(args).run()


class Device:
    def __init__(self, args):
        self.target = args.target
        self.v5 = args.mqtt_version == "5"
        self.presence = f"{args.presence_root}/{args.target}"
        self.seen = OrderedDict()
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=args.target,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        # PROTOCOL.md, "Presence": a retained last will says offline.
        self.client.will_set(self.presence, '{"online": false}', qos=1, retain=True)
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.port = args.port

    def run(self):
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        if self.v5:
            self.client.connect("127.0.0.1", self.port, clean_start=True)
        else:
            self.client.connect("127.0.0.1", self.port)
        self.client.loop_forever()

    def stop(self):
        # A clean shutdown says offline itself (the will goes only on a crash).
        self.client.publish(self.presence, '{"online": false}', qos=1, retain=True)
        self.client.disconnect()

    def on_connect(self, client, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            sys.exit(f"connect refused: {reason_code}")
        # PROTOCOL.md, "Delivery receipts": without TCP_NODELAY a receipt and
        # the answer right after it wait ~40 ms for the broker's delayed ACK.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(f"{self.target}/#", qos=1)

    def on_subscribe(self, client, _userdata, _mid, _reason_codes, _properties):
        client.publish(self.presence, '{"online": true}', qos=1, retain=True)
        print("ready", flush=True)

    # --- requests -------------------------------------------------------

    def on_message(self, _client, _userdata, msg):
        levels = msg.topic.split("/")
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        if len(levels) == 4 and levels[0] == self.target:
            _, method, prefix, m_id = levels
            reply_to = response_topic or f"{prefix}/{m_id}/{self.target}/{method}/ack"
            self.request(method, m_id, msg.payload, reply_to, correlation)
        elif len(levels) == 2 and levels[0] == self.target and response_topic:
            self.plain(levels[1], msg.payload, response_topic, correlation)
        # Anything else under our target is not a request: ignored.

    def request(self, method, m_id, payload, reply_to, correlation):
        def answer(status, response, raw_status=None):
            body = {"id": m_id, "status": raw_status if raw_status is not None else status,
                    "response": response}
            self.publish(reply_to, body, correlation)

        try:
            req = json.loads(payload)
        except ValueError:
            return answer(400, "request payload is not JSON")
        if not isinstance(req, dict) or not isinstance(req.get("id"), str):
            return answer(400, "request payload has no string id")
        if req["id"] != m_id:
            return answer(400, "payload id differs from the topic's")
        try:
            uuid.UUID(m_id)  # v4, or v5 for a keyed call: any UUID
        except ValueError:
            return answer(400, "id is not a UUID")
        with self.lock:
            if m_id in self.seen:
                return  # a redelivery: run once
            self.seen[m_id] = True
            if len(self.seen) > SEEN_MAX:
                self.seen.popitem(last=False)
        timeout_ms = req.get("timeout_ms")
        if timeout_ms is not None and "timestamp" in req:
            sent = int(req["timestamp"])  # a decimal string, or a number
            if time.time() * 1000 > sent + timeout_ms + SKEW_MS:
                return  # past its deadline: not run, not answered
        if req.get("receipt") is True:
            # No Correlation Data on a receipt: it is not an answer.
            self.publish(reply_to, {"delivered": m_id}, None)
        value = req.get("request")
        if method == "echo":
            answer(200, value)
        elif method == "add":
            if isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in "ab"):
                answer(200, value["a"] + value["b"])
            else:
                answer(400, {"code": "bad_operands", "expected": {"a": "number", "b": "number"}})
        elif method == "slow":
            delay = value if isinstance(value, (int, float)) else 1000
            threading.Timer(delay / 1000, answer, args=(200, "done")).start()
        elif method == "bad_status":
            answer(201, "created", raw_status="201")
        else:
            answer(404, f"no such method: {method}")

    def plain(self, method, payload, reply_to, correlation):
        try:
            value = json.loads(payload)
        except ValueError:
            value = payload.decode("utf-8", "replace")
        if method == "echo":
            body = {"status": 200, "response": value}
        else:
            body = {"status": 404, "response": f"no such method: {method}"}
        self.publish(reply_to, body, correlation)

    def publish(self, topic, body, correlation):
        props = None
        if self.v5 and correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        self.client.publish(topic, json.dumps(body), qos=0, properties=props)


if __name__ == "__main__":
    main()
