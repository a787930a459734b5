"""Request signatures against the providers' own documented examples."""

from __future__ import annotations

from twilio.request_validator import RequestValidator

from gateway_plugins.sms._providers import aliyun_signature

from .conftest import twilio_config


def test_aliyun_rpc_signature_matches_the_documented_example():
    # Alibaba Cloud's signature documentation (RPC, HMAC-SHA1): DescribeRegions, GET.
    params = {"Timestamp": "2016-02-23T12:46:24Z", "Format": "XML", "AccessKeyId": "testid",
              "Action": "DescribeRegions", "SignatureMethod": "HMAC-SHA1",
              "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf", "Version": "2014-05-26",
              "SignatureVersion": "1.0"}
    assert aliyun_signature("testsecret", "GET", params) == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_aliyun_signature_matches_the_documented_sendsms_example_with_chinese_and_json():
    # The SMS documentation's SendSms example: a Chinese sign name and a JSON TemplateParam.
    params = {"AccessKeyId": "testId", "Action": "SendSms", "Format": "XML", "OutId": "123",
              "PhoneNumbers": "15300000001", "RegionId": "cn-hangzhou", "SignName": "阿里云短信测试专用",
              "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
              "SignatureVersion": "1.0", "TemplateCode": "SMS_71390007", "TemplateParam": '{"customer":"test"}',
              "Timestamp": "2017-07-12T02:42:19Z", "Version": "2017-05-25"}
    assert aliyun_signature("testSecret", "GET", params) == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


def test_twilio_validator_reproduces_twilios_documented_example():
    # Twilio's webhook-security example: auth token 12345, this URL and these parameters.
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert RequestValidator("12345").compute_signature(url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


async def test_the_webhook_signature_covers_the_query_string_and_every_parameter(gateway_factory, nats_server):
    # The example's parameters and token, posted to our route with the example's query:
    # signed over the public URL with the query they pass, one changed parameter fails.
    import httpx

    cfg = twilio_config(public_url="https://mycompany.com")
    cfg["twilio"]["auth_token"] = "12345"
    gw = await gateway_factory({"sms": cfg})
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}") as c:
        url = "https://mycompany.com/channels/sms/twilio/status?foo=1&bar=2"
        sig = RequestValidator("12345").compute_signature(url, params)
        ok = await c.post("/channels/sms/twilio/status?foo=1&bar=2", data=params, headers={"X-Twilio-Signature": sig})
        bad = await c.post("/channels/sms/twilio/status?foo=1&bar=2", data={**params, "Digits": "1235"},
                           headers={"X-Twilio-Signature": sig})
    assert ok.status_code == 400 and "MessageSid" in ok.text  # signature accepted, not a status callback
    assert bad.status_code == 403
