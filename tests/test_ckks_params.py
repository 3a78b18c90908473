"""CKKS parameter validation: secure defaults, insecure chains refused with the bound named."""

import pytest

from aggregation.ckks import MAX_LOG_Q_128, CKKSConfig, headroom
from aggregation.ckks.masking import plan as mask_plan
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError


def test_defaults_meet_the_128_bit_bound_with_one_data_prime():
    cfg = CKKSConfig()
    assert cfg.log_q <= MAX_LOG_Q_128[cfg.poly_modulus_degree]
    assert cfg.data_primes == 1
    assert cfg.slots == cfg.poly_modulus_degree // 2
    assert headroom(cfg) == 2.0 ** (60 - 28 - 1)
    # the masks of MovieLens's 943 clients (up to 1023) with max_abs 1024 fit under it; 1024 do not
    plan = mask_plan(cfg, 1023)
    assert plan.b == 21 and 1023 * (2**plan.b + cfg.max_abs) < headroom(cfg)
    with pytest.raises(ValueError, match="1024 clients x"):
        mask_plan(cfg, 1024)


def test_nvflare_default_parameters_are_accepted():
    cfg = CKKSConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40)
    assert cfg.log_q == 140 and cfg.data_primes == 2


@pytest.mark.parametrize(
    "n, bits",
    [(4096, (60, 50)), (2048, (30, 30)), (8192, (60, 60, 60, 40)), (1024, (14, 14))],
)
def test_chain_above_the_he_standard_bound_is_refused(n, bits):
    with pytest.raises(ValueError) as exc:
        CKKSConfig(poly_modulus_degree=n, coeff_mod_bit_sizes=bits, scale_bits=20)
    msg = str(exc.value)
    assert "coeff_mod_bit_sizes" in msg and f"{sum(bits)} bits" in msg and f"{MAX_LOG_Q_128[n]} bits" in msg


def test_chain_exactly_at_the_bound_is_accepted():
    assert CKKSConfig(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), scale_bits=40).log_q == 109


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree must be one of"),
        ({"coeff_mod_bit_sizes": (56,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": (61, 40)}, "coeff_mod_bit_sizes[0] = 61"),
        ({"scale_bits": 59}, "scale_bits = 59"),
        ({"threads": 0}, "threads"),
        ({"max_abs": 0.0}, "max_abs"),
        ({"min_contributors": 1}, "min_contributors"),
        ({"flood_queries": 0}, "flood_queries"),
        ({"check_fraction": 0.0}, "check_fraction"),
        ({"masking": {"bits": 32}}, "aggregation.masking.bits"),
        ({"masking": {"no_such_key": 1}}, "aggregation.masking"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=None) as exc:
        CKKSConfig(**kwargs)
    assert needle in str(exc.value)


def test_run_config_refuses_an_insecure_ckks_section_naming_the_key():
    import toy_task

    raw = toy_task.toy_config()
    raw["aggregation"] = {"kind": "ckks", "coeff_mod_bit_sizes": [60, 60]}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert "coeff_mod_bit_sizes" in str(exc.value) and "109 bits" in str(exc.value)


def test_yaml_list_becomes_a_tuple_and_round_rotation_is_accepted():
    from fedrlhf_secure.configtypes import from_mapping

    cfg = from_mapping(CKKSConfig, {"coeff_mod_bit_sizes": [52, 40], "scale_bits": 30, "rotate_keys": "round"})
    assert cfg.coeff_mod_bit_sizes == (52, 40) and cfg.rotate_keys == "round"
