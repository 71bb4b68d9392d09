"""A bank on MQTT: its topics, who may receive them, its Home Assistant config, and its
retained state following its members, on a real broker (the machine's Mosquitto)."""

from __future__ import annotations

import json

import pytest

from bridge.banks import Bank
from bridge.doors.broker.access import AccessPolicy
from bridge.extensions.bank_publisher import bank_discovery_payload
from bridge.models import AddBank, EditBatmon
from bridge.topics import Topics
from tests.broker_support import ALICE, ALICE_KEY, BOB, BOB_KEY, FakeCredentials
from tests.home_assistant import discovery_problems
from tests.support import Env, payload_json, wait_until

TOPICS = Topics()


def test_bank_topics_are_recognised_only_as_built() -> None:
    assert TOPICS.bank_of_user_topic("batmon/bank/9/state") == 9
    assert TOPICS.bank_of_user_topic("batmon/bank/9/availability") == 9
    assert TOPICS.bank_of_user_topic("homeassistant/device/batmon_bank_9/config") == 9
    for topic in ("batmon/bank/09/state", "batmon/bank/9/update", "batmon/bank/+/state",
                  "batmon/bank/9/state/x", "homeassistant/device/batmon_bank_9/x/config",
                  "batmon/9/state", "homeassistant/sensor/batmon_bank_9/config"):  # fmt: skip
        assert TOPICS.bank_of_user_topic(topic) is None, topic


def test_only_the_banks_owner_receives_its_topics() -> None:
    policy = AccessPolicy(credentials=FakeCredentials(bank_owner={9: 1}), topics=TOPICS,
                          bridge_username="b", bridge_password="p")  # fmt: skip
    alice = policy.authenticate(ALICE, ALICE_KEY, peer="10.0.0.1")
    bob = policy.authenticate(BOB, BOB_KEY, peer="10.0.0.1")
    device = policy.authenticate("5", "tok-five", peer="10.0.0.1")
    assert alice is not None and bob is not None and device is not None
    topics = [TOPICS.bank_state(9), TOPICS.bank_availability(9), TOPICS.bank_discovery(9)]
    assert all(policy.may_subscribe(alice, t) and policy.may_receive(alice, t) for t in topics)
    assert not any(policy.may_subscribe(bob, t) or policy.may_receive(bob, t) for t in topics)
    assert not any(policy.may_receive(device, t) for t in topics)
    # Home Assistant's discovery filter matches it; delivery is vetted per owner.
    assert policy.may_subscribe(bob, "homeassistant/device/+/config")
    assert not policy.may_receive(bob, TOPICS.bank_discovery(9))
    assert not policy.may_receive(alice, TOPICS.bank_discovery(10))  # nobody's


@pytest.mark.parametrize("energy", [None, 1.5])
def test_bank_config_passes_home_assistants_rules(energy: float | None) -> None:
    bank = Bank(id=9, user_id=1, name="House bank", batmon_ids=[1, 2])
    state = {"energy_charged_kwh": energy, "energy_discharged_kwh": energy}
    config = bank_discovery_payload(bank, state, 300, TOPICS)
    assert discovery_problems(config) == []
    assert config["dev"]["identifiers"] == ["batmon_bank_9"]
    assert config["state_topic"] == "batmon/bank/9/state"
    availability = [a["topic"] for a in config["availability"]]
    assert availability == ["batmon/bridge/state", "batmon/bank/9/availability"]
    # No empty sensors: the energy sums appear once a member has counters.
    assert ("energy_charged" in config["cmps"]) == (energy is not None)
    if energy is not None:
        assert config["cmps"]["energy_charged"]["device_class"] == "energy"
        assert config["cmps"]["energy_charged"]["unit_of_measurement"] == "kWh"
    assert config["cmps"]["soc"]["value_template"] == "{{ value_json.bank_soc }}"
    assert len({c["unique_id"] for c in config["cmps"].values()}) == len(config["cmps"])


def test_bank_state_follows_members_edits_and_deletes(env: Env) -> None:
    a, b = env.add_batmon(), env.add_batmon()
    env.loop.call(env.core.edit_batmon, a, EditBatmon(batmon_id=a.id, capacity_ah=100))
    env.loop.call(env.core.edit_batmon, b, EditBatmon(batmon_id=b.id, capacity_ah=300))
    env.ingest(a, soc=40, voltage=12.8)
    env.ingest(b, soc=80, voltage=13.2)
    spec = AddBank(bank_name="Pair", batmon_ids=[a.id, b.id])
    bank = env.loop.call(env.core.banks.add, env.user, spec)
    env.bridge()
    state_topic, config_topic = env.topics.bank_state(bank.id), env.topics.bank_discovery(bank.id)
    probe = env.probe(state_topic, env.topics.bank_availability(bank.id), config_topic)
    assert payload_json(probe.wait_for(state_topic))["bank_soc"] == pytest.approx(70)
    assert probe.wait_for(env.topics.bank_availability(bank.id)).payload == b"online"
    assert payload_json(probe.wait_for(config_topic))["dev"]["name"] == "Pair"

    env.ingest(a, soc=100)  # (100x100 + 80x300) / 400
    probe.wait_for(state_topic, lambda m: payload_json(m)["bank_soc"] == pytest.approx(85))

    env.loop.run(env.core.delete_batmon(b))  # it leaves the bank
    left = probe.wait_for(state_topic, lambda m: payload_json(m)["batmon_ids"] == [a.id])
    assert payload_json(left)["bank_soc"] == pytest.approx(100)

    env.loop.call(env.core.banks.delete, bank)
    for topic in (state_topic, config_topic, env.topics.bank_availability(bank.id)):
        probe.wait_for(topic, lambda m: m.payload == b"")


def test_home_assistant_online_resends_the_banks_config(env: Env) -> None:
    a = env.add_batmon()
    bank = env.loop.call(env.core.banks.add, env.user, AddBank(bank_name="One", batmon_ids=[a.id]))
    env.bridge()
    config_topic = env.topics.bank_discovery(bank.id)
    probe = env.probe(config_topic)
    probe.wait_for(config_topic)
    probe.publish(env.topics.homeassistant_status, "online")
    configs = probe.wait_count(config_topic, 2)
    assert json.loads(configs[-1].payload)["dev"]["name"] == "One"


def test_a_member_going_offline_or_changing_capacity_republishes_the_bank_at_once(env: Env) -> None:
    quick, slow = env.add_batmon(update_period=1), env.add_batmon(update_period=300)
    env.ingest(quick, soc=20)
    env.ingest(slow, soc=60)
    spec = AddBank(bank_name="Pair", batmon_ids=[quick.id, slow.id])
    bank = env.loop.call(env.core.banks.add, env.user, spec)
    env.bridge()
    state_topic = env.topics.bank_state(bank.id)
    probe = env.probe(state_topic)
    assert payload_json(probe.wait_for(state_topic))["bank_soc"] == pytest.approx(40)

    # The owner sets both capacities: SoC is weighted from then on.
    env.loop.call(env.core.edit_batmon, quick, EditBatmon(batmon_id=quick.id, capacity_ah=300))
    env.loop.call(env.core.edit_batmon, slow, EditBatmon(batmon_id=slow.id, capacity_ah=100))
    probe.wait_for(state_topic, lambda m: payload_json(m)["bank_soc"] == pytest.approx(30))

    # What the watchdog does at the deadline: the bank leaves the silent member out.
    wait_until(lambda: env.loop.call(env.core.expire_if_due, quick.id), 5, "quick expired")
    left = probe.wait_for(state_topic, lambda m: payload_json(m)["offline_batmon_ids"] == [quick.id])
    assert payload_json(left)["bank_soc"] == pytest.approx(60)
